"""Haystack's own TEI, vLLM and Cohere rankers, unchanged, reranking images with `mmr serve`.

    pip install haystack-ai huggingface-api-haystack vllm-haystack cohere-haystack
    python examples/haystack_rankers.py                          # offline demo collection
    python examples/haystack_rankers.py --url http://127.0.0.1:8000 /photos/a.jpg /photos/b.jpg
"""

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

from haystack import Document  # noqa: E402
from haystack.utils import Secret  # noqa: E402
from haystack_integrations.components.rankers.cohere import CohereRanker  # noqa: E402
from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker  # noqa: E402
from haystack_integrations.components.rankers.vllm import VLLMRanker  # noqa: E402

from _demo import parse, server  # noqa: E402

args = parse(__doc__.splitlines()[0])
key = Secret.from_token(args.api_key) if args.api_key else None
with server(args) as (url, paths, _):
    docs = [Document(content=p) for p in paths]
    rankers = {
        "TEI     (POST /rerank)": HuggingFaceTEIRanker(url=url, top_k=3, token=key),
        "vLLM    (POST /v1/rerank)": VLLMRanker(model="mmr", api_base_url=f"{url}/v1", api_key=key, top_k=3),
        "Cohere  (POST /v2/rerank)": CohereRanker(model="mmr", api_base_url=url, api_key=key or Secret.from_token("unused"), top_k=3),
    }
    for name, ranker in rankers.items():
        best = ranker.run(query=args.query, documents=docs)["documents"]
        print(name, [(os.path.basename(d.content), round(d.score, 3)) for d in best])
