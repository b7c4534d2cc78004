# thaw's container image: `make image` (scripts/image.sh) builds it.
#
# Base: none. The image is FROM scratch and holds only what the engine runs
# with, all staged by scripts/image.sh into the build context (target/image/):
#   /usr/local/bin/thaw                  the release binary (debug info stripped)
#   /lib, /lib64, /usr/lib               its shared libraries and ONNX Runtime's,
#                                        as `ldd` resolves them on the build host
#   /opt/thaw/lib/libonnxruntime.so.*    ONNX Runtime, from the onnxruntime
#                                        PyPI wheel that onnx/setup.sh installs
#   /opt/thaw/models/text/               the text encoder (onnx/setup.sh)
#   /etc/ssl/certs/ca-certificates.crt   CA roots, for Kafka over TLS
#   /etc/passwd, /etc/group, /etc/nsswitch.conf, /tmp
# Why scratch: no registry is reachable here, so there is no base image to
# pull, and building one (debootstrap a Debian minbase, `docker import`) costs
# minutes of CI and 100+ MB for a shell and a package manager the engine never
# uses. The libraries come from the host that built the binary, so they are
# the ones it was linked against (Debian bookworm's glibc, libstdc++). What is
# not here: a shell, a package manager, the trained model (mounted at
# /opt/thaw/models/mpkg: the Helm chart's model.volume) and the datasets.
#
# Two stages: `context` is the staged tree as it came; the runtime stage takes
# from it only the paths named below, so a stray file in the build context
# cannot reach the image. Build with the classic builder or BuildKit alike.

FROM scratch AS context
COPY rootfs/ /

FROM scratch
COPY --from=context /lib/ /lib/
COPY --from=context /lib64/ /lib64/
COPY --from=context /usr/ /usr/
COPY --from=context /etc/ /etc/
COPY --from=context /opt/thaw/ /opt/thaw/
COPY --from=context /tmp/ /tmp/
# The engine finds ONNX Runtime through ORT_DYLIB_PATH (model.ort_dylib in
# thaw.toml overrides it), and its model folders relative to /opt/thaw:
# model.text_dir = models/text and model.dir = models/mpkg by default.
ENV ORT_DYLIB_PATH=/opt/thaw/lib/libonnxruntime.so
WORKDIR /opt/thaw
# Non-root: the distroless "nonroot" ids; /etc/passwd names them.
USER 65532:65532
# /metrics, /healthz, /readyz (http.listen).
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/thaw"]
CMD ["serve"]
