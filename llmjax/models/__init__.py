"""Every architecture module; importing this package registers them all (see llmjax.registry)."""

# Pallas's fuser registers a JAX setting that is part of every jit's trace context when it is first
# imported, which JAX 0.11.2 does lazily, inside the first Pallas kernel run in interpret mode (a CPU):
# every function traced before then missed its cache afterwards and was traced and compiled again
# (the sampler's second `generate` with the Pallas decode kernels; bench timed that as decoding).
# Imported here, before anything is traced.
import jax.experimental.pallas.fuser  # noqa: F401, E402

from llmjax.models import gqa, linformer, mla, modern, moe, ssm, vanilla  # noqa: F401, E402
