# The image manifests/ deploys. Build: docker build -t ghcr.io/<you>/opsbot:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY bot ./bot
COPY commands ./commands
COPY policies ./policies
RUN pip install --no-cache-dir -c constraints.txt . && useradd --uid 10001 --no-create-home opsbot
USER 10001
ENTRYPOINT ["opsbot"]
CMD ["serve"]
