# The image the manifests name: ghcr.io/ringpilot/ringpilot:0.1.0 (operator, Ray head and
# workers, job submitters all run it). Build from the repository root:
#   docker build -t ghcr.io/ringpilot/ringpilot:0.1.0 .
#   docker build -t ringpilot:dev . && kind load docker-image ringpilot:dev   # overlays/dev
# Base: Ray's own image at the Ray version the operator gives KubeRay (operators/rayjob.py
# RAY_VERSION; the version .venv holds), Python 3.11 like the tested venv. The -gpu variant: PyPI's
# Linux torch wheel is the CUDA build and also runs on CPU nodes, so one image serves the tiny
# CPU run and the L40S sample. tests/manifests/test_dockerfile.py checks these pins statically.
FROM rayproject/ray:2.60.0-py311-gpu

LABEL org.opencontainers.image.ref.name="ghcr.io/ringpilot/ringpilot:0.1.0" \
      org.opencontainers.image.title="ringpilot" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image's `ray` user (uid 1000, group users): never root. The pods also set
# runAsNonRoot and runAsUser 1000.
USER 1000:100
WORKDIR /home/ray

# torch first and pinned (as `make setup` does), then ringpilot as a regular, non-editable
# package, with torch and Ray held at their pins so no dependency moves them.
COPY --chown=1000:100 pyproject.toml README.md /tmp/ringpilot/
COPY --chown=1000:100 specs /tmp/ringpilot/specs
COPY --chown=1000:100 topology /tmp/ringpilot/topology
COPY --chown=1000:100 ray_jobs /tmp/ringpilot/ray_jobs
COPY --chown=1000:100 operators /tmp/ringpilot/operators
COPY --chown=1000:100 ringpilot /tmp/ringpilot/ringpilot
RUN pip install --no-cache-dir "torch==2.13.0" \
    && printf 'torch==2.13.0\nray==2.60.0\n' > /tmp/pins.txt \
    && pip install --no-cache-dir -c /tmp/pins.txt /tmp/ringpilot \
    && rm -rf /tmp/ringpilot /tmp/pins.txt \
    && python -c "import ringpilot, operators, ray_jobs, torch, ray; assert ray.__version__ == '2.60.0'"

ENV RAY_USAGE_STATS_ENABLED=0
