# kp-gateway: one container, DICOM on 11112, HTTP on 8080, data on the /data volume.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dcmtk dicom3tools \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 kp
WORKDIR /app
COPY pyproject.toml README.md config.toml ./
COPY kp_gateway ./kp_gateway
RUN pip install --no-cache-dir .

RUN mkdir -p /data && chown kp:kp /data
USER kp
VOLUME ["/data"]
EXPOSE 11112 8080
ENV KP_GATEWAY_STORAGE_PATH=/data
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=3).status == 200 else 1)"
ENTRYPOINT ["kp-gateway"]
CMD ["serve", "--config", "/app/config.toml"]
