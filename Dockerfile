# kvmnet-exporter. Every build step is deploy/build-wheel-venv.sh, which tests/e2e/test_wheel_venv.py also runs (build
# the wheel, install it into a clean venv, start the exporter from it, scrape it, run this HEALTHCHECK command), and
# the test reads HEALTHCHECK, ENTRYPOINT and the script lines from this file.
#
#   docker build -t kvmnet-exporter .
#   docker run -d --name kvmnet --network host --pid host \
#     --cap-drop ALL --cap-add NET_RAW --cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add DAC_READ_SEARCH \
#     --security-opt apparmor=unconfined \
#     -v /run/netns:/run/netns:ro,rslave -v /run/libvirt:/run/libvirt:ro \
#     kvmnet-exporter --netns lab-host
#
# Why each grant (README "Deploying"):
#   --network host   the bridges and taps are the host's; a container network namespace would show its own veth.
#   --pid host       tap -> guest identity reads QEMU's /proc/PID/{cmdline,fd,fdinfo}: the host's processes.
#   NET_RAW          the prober's raw ICMP sockets.
#   SYS_ADMIN        setns() into the namespaces named with --netns (mounted from the host's /run/netns, rslave so
#                    namespaces created later appear). Not needed when watching only the host namespace.
#   SYS_PTRACE, DAC_READ_SEARCH   reading another user's /proc/PID/fd (libvirt runs QEMU as libvirt-qemu).
#   apparmor=unconfined           only if your host's AppArmor profile for containers blocks setns or /run/netns
#                                 (Docker's default seccomp profile allows setns once SYS_ADMIN is granted).
# The image runs as a non-root user; the interpreter carries those four as permitted file capabilities and the
# exporter raises what the container was granted (and says at start what is missing).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The commit for kvmnet_build_info{revision} (RUN sees ARGs as environment variables):
#   docker build --build-arg KVMNET_REVISION=$(git rev-parse HEAD) .
ARG KVMNET_REVISION=unknown
COPY pyproject.toml README.md LICENSE /src/
COPY exporter /src/exporter
COPY setup /src/setup
COPY common /src/common
COPY deploy/build-wheel-venv.sh /usr/local/bin/build-wheel-venv.sh
RUN build-wheel-venv.sh build /src /opt/kvmnet

FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends libcap2-bin && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kvmnet
COPY --from=build /opt/kvmnet /opt/kvmnet
COPY deploy/build-wheel-venv.sh /usr/local/bin/build-wheel-venv.sh
# File capabilities are set here, not in the build stage: COPY --from does not carry them across.
RUN build-wheel-venv.sh caps /opt/kvmnet
USER kvmnet
EXPOSE 9848
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/opt/kvmnet/bin/python3", "-m", "kvmnet.exporter.healthcheck"]
ENTRYPOINT ["/opt/kvmnet/bin/kvmnet-exporter"]
