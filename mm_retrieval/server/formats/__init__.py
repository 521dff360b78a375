"""Wire formats: each module holds one API's request/response models, exactly as that API's own
server defines them, and turns its requests into :class:`~mm_retrieval.server.engine.Engine` calls.

==================  ============  =====================================================
route               format        answered like
==================  ============  =====================================================
``POST /v2/rerank`` ``cohere``    Cohere's v2 rerank API (and Milvus' ``cohere`` provider)
``POST /rerank``    ``tei``       Hugging Face TEI's /rerank (a body with ``texts``)
``POST /rerank``    ``vllm``      vLLM's /rerank (a body with ``documents``; Milvus' ``vllm`` provider)
``POST /v1/rerank`` ``vllm``      vLLM / Jina rerank
``POST /search``    ``native``    ``mmr search --json``
==================  ============  =====================================================
"""
