"""The paper's analyses (section 4.5, appendix D): attention rollout and mean attention distance,
position-embedding similarity, patch-embedding filters, few-shot linear evaluation and inference
speed. Pure computations live in `attention`, `embeddings`, `fewshot` and `speed`; figures in
`plots`; dataset examples in `data`; `outputs` runs an analysis on a loaded model and writes its
PNG and JSON files."""
