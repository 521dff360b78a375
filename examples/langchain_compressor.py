"""LangChain: the mmr-langchain plugin's MMRReranker as a document compressor.

    pip install langchain-core ./plugins/mmr-langchain
    python examples/langchain_compressor.py
"""

from langchain_core.documents import Document

from _demo import parse, server
from mmr_langchain import MMRReranker

args = parse(__doc__.splitlines()[0])
with server(args) as (url, paths, _):
    docs = [Document(page_content=f"photo {p.rsplit('/', 1)[-1]}", metadata={"path": p}) for p in paths]
    for d in MMRReranker(url=url, api_key=args.api_key, top_n=3).compress_documents(docs, args.query):
        print(round(d.metadata["relevance_score"], 3), d.page_content)
