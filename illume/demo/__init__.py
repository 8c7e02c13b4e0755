"""The embedded demo's own models, apart from the library's backends.

- `illume.demo.tiny_models`: models built offline from configs: the demo's MAGMA before pre-training
  (`build_demo_vlm`) and tiny random HF VLMs for tests and CPU experiments (`build_tiny_hf_vlm`). Both use
  the shapes world's vocabulary, which is why they live here and not in illume/models/.
- `illume.demo.pretrain`: pre-training and caching the demo base model (`ensure_demo_model`), which
  `illume.loading.load_vlm` loads when a config names no model.
"""
