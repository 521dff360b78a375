"""Milvus calls `mmr serve`: a model rerank Function (provider "cohere") passed to
`MilvusClient.search` reranks the hits with mm_retrieval's reranker, inside Milvus' own search.

    python examples/milvus_rerank_function.py            # offline demo: Milvus Lite + the demo collection

Against a Milvus server, the same Function works with provider "cohere" and base_url
http://MMR_HOST:8000/v2; Milvus 2.6 servers also offer provider "tei" or "vllm" with
endpoint http://MMR_HOST:8000 (both post to /rerank, which mmr serve answers in either format).
"""

from pymilvus import Function, FunctionType

from _demo import parse, server

args = parse(__doc__.splitlines()[0])
args.url = None  # this example searches the demo's Milvus Lite file itself, in-process
with server(args) as (url, _, demo):
    pipe = demo.pipeline(rerank=False)
    ranker = Function(
        name="mmr_rerank", input_field_names=["path"], function_type=FunctionType.RERANK,
        params={"reranker": "model", "provider": "cohere", "model_name": "mmr", "queries": [args.query],
                "base_url": f"{url}/v2", "api_key": args.api_key or "unused"},
    )
    vector = pipe.encoder.encode_text([args.query]).tolist()
    plain = pipe.store.client.search(pipe.store.name, data=vector, anns_field="vector", limit=3, output_fields=["path"])[0]
    reranked = pipe.store.client.search(pipe.store.name, data=vector, anns_field="vector", limit=3, output_fields=["path"], ranker=ranker)[0]
    print("Milvus first stage:", [(h["entity"]["path"].rsplit("/", 1)[-1], round(h["distance"], 3)) for h in plain])
    print("Milvus + mmr rerank:", [(h["entity"]["path"].rsplit("/", 1)[-1], round(h["distance"], 3)) for h in reranked])
    print("mmr search --rerank:", [(h.path.rsplit("/", 1)[-1], round(h.score, 3)) for h in demo.pipeline().search(args.query, k=3, candidates=30).hits])
