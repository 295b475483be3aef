"""The paper's analyses (section 4.5, appendix D): attention rollout and mean attention distance,
position-embedding similarity, patch-embedding filters, few-shot linear evaluation and inference
speed. Pure computations live in `attention`, `embeddings` and `fewshot` (speed is timed by
vit_jax.benchmark_lib, the one timer); figures in `plots`; dataset examples in `data`; `outputs`
holds the registry of analyses, each writing its PNG and JSON files."""
