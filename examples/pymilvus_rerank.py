"""pymilvus `model` rerank functions against `mmr serve`: the mmr-pymilvus plugin's
MMRRerankFunction, and pymilvus' own TEIRerankFunction, unchanged.

    pip install "pymilvus[model]" ./plugins/mmr-pymilvus
    python examples/pymilvus_rerank.py
"""

from pymilvus.model.reranker import TEIRerankFunction

from _demo import parse, server
from mmr_pymilvus import MMRRerankFunction

args = parse(__doc__.splitlines()[0])
with server(args) as (url, paths, _):
    for name, fn in [("MMRRerankFunction", MMRRerankFunction(url, api_key=args.api_key)), ("TEIRerankFunction", TEIRerankFunction(url))]:
        if name == "TEIRerankFunction" and args.api_key:
            continue  # pymilvus' TEI function sends no API key
        print(name, [(r.index, r.text.rsplit("/", 1)[-1], round(r.score, 3)) for r in fn(args.query, paths, top_k=3)])
