# Edgeway gateway image. Build: docker build -t edgeway .
# Run:   docker run -p 8080:8080 -v $PWD/policies/gateway.yaml:/etc/edgeway/policy.yaml:ro \
#          -e REDIS_URL=redis://redis:6379 edgeway
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY middleware ./middleware
COPY edgeway ./edgeway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home edgeway
COPY --from=build /install /usr/local
COPY policies /etc/edgeway/policies
ENV EDGEWAY_POLICY=/etc/edgeway/policy.yaml \
    PYTHONUNBUFFERED=1
# the example policy is the default; mount your own at /etc/edgeway/policy.yaml
RUN cp /etc/edgeway/policies/gateway.yaml /etc/edgeway/policy.yaml
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/_edgeway/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["edgeway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
