"""The paper's claims checked by miniature experiments (`python -m vit_jax.claims`).

`experiments`: models, recipe, scales and run configs; `runner`: trains the runs (resumable,
reusing finished ones); `measure`: numbers and analyses of finished runs; `verdicts`: the rules;
`catalog`: the claims; `report`: claims.md and claims.json (figures: vit_jax.analysis.plots).
"""
