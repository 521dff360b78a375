"""The server code path: the same store code against `milvus-lite server` on 127.0.0.1."""

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.errors import StoreError
from tests.helpers import COLORS, TINY, free_port


@pytest.mark.slow  # starts a milvus-lite server
def test_index_and_search_over_grpc(milvus_server, image_folder):
    pipe = Pipeline(db=milvus_server, collection="server_test", encoder={**TINY, "workers": 0})
    report = pipe.index(image_folder, progress=False)
    assert report.indexed == len(COLORS)
    assert pipe.index(image_folder, progress=False).indexed == 0  # idempotent over the server too
    res = pipe.search("a green picture", k=3, filter='path like "%nested%"')
    assert res.hits and all("nested" in h.path for h in res.hits)
    # the same results as an embedded database with the same model and images
    local = Pipeline(db=str(image_folder.parent / "local.db"), encoder={**TINY, "workers": 0})
    local.index(image_folder, progress=False)
    ref = local.search("a green picture", k=3, filter='path like "%nested%"')
    assert [h.id for h in res.hits] == [h.id for h in ref.hits]


def test_unreachable_server_is_a_retriable_store_error():
    port = free_port()  # nothing listens here
    pipe = Pipeline(db=f"http://127.0.0.1:{port}", store={"timeout": 2.0}, encoder={**TINY, "workers": 0})
    with pytest.raises(StoreError) as e:
        pipe.search("anything")
    assert e.value.retriable and f"127.0.0.1:{port}" in str(e.value)
