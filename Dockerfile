# mm_retrieval with `mmr serve` as the default command (see the `mmr` service in docker-compose.yml).
# PyPI's torch wheels for Linux include CUDA: the same image runs on a GPU host or on CPU.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt ./.ci/
COPY mm_retrieval ./mm_retrieval
# The lock the tests pass with (README: Quick start).
RUN pip install --no-cache-dir -c .ci/constraints.txt .
ENV MMR_CACHE_DIR=/data/cache HF_HOME=/data/hf
VOLUME /data
EXPOSE 8000
CMD ["mmr", "serve", "--host", "0.0.0.0", "--port", "8000"]
