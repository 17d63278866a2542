"""`python -m threadline.local_model.llama_server ARGS`: llama-cpp-python's server, safe on AMX.

The arguments are those of `python -m llama_cpp.server`. The one difference: the
model is loaded with `use_extra_bufts = False`, so ggml never repacks weights into
an extra CPU buffer type. On CPUs with AMX that repack path crashes the process at
the first inference (a general protection fault in libggml-cpu, llama.cpp issue
#20824). Turning it off at load time holds on every CPU and for every build of the
library, whereas a build option only holds for the one wheel built with it (and
`GGML_NATIVE`, the default, enables AMX wherever the build machine has it). The
cost is the repacked kernels for a few quantisations on AVX2/AVX-512 machines;
the bundled models are too small for that to show.

llama-cpp-python exposes the field only on the C struct, not as a `Llama` or
server option, so the struct's factory is wrapped before the server loads a model.
"""

from __future__ import annotations

from typing import Any


def disable_extra_buffer_types() -> None:
    """Make every model loaded from now on skip extra buffer types (no AMX repack)."""
    import llama_cpp.llama_cpp as lib

    # A ctypes struct takes any attribute silently: check the field is really there.
    if "use_extra_bufts" not in {name for name, *_ in lib.llama_model_params._fields_}:
        raise SystemExit(
            "this llama-cpp-python cannot load models without extra buffer types "
            "(use_extra_bufts); upgrade it: pip install --upgrade 'llama-cpp-python[server]'"
        )
    default_params = lib.llama_model_default_params
    if getattr(default_params, "_threadline_no_extra_bufts", False):
        return

    def params_without_extra_bufts() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    params_without_extra_bufts._threadline_no_extra_bufts = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = params_without_extra_bufts


def main() -> None:
    disable_extra_buffer_types()
    from llama_cpp.server.__main__ import main as serve

    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
