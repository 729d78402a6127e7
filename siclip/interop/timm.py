"""timm in siclip: block converters and attention readers for its Vision Transformer blocks.

Imported by siclip's registries the first time they meet a timm object (never by siclip otherwise).
"""

from __future__ import annotations

import timm  # noqa: F401  (this module exists for this library; siclip.blocks.registry imports it lazily)

# ── block converters (SAS-P) ─────────────────────────────────────────────────────────────────────────────────────


# ── attention readers (divergence) ───────────────────────────────────────────────────────────────────────────────

