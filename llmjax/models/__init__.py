"""Every architecture module; importing this package registers them all (see llmjax.registry)."""

from llmjax.models import gqa, linformer, mla, modern, moe, ssm, vanilla  # noqa: F401
