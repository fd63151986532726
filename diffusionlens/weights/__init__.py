"""The model's parameters: `checkpoint` (loading and saving checkpoints, transformers' names for ours),
`device_map` (placing blocks on devices), `tl_weights` (TransformerLens-shaped per-head weight views),
`factored_matrix` (FactoredMatrix for low-rank circuit products), `fingerprint` (a digest of config and
weights that traces record) and `tensor_file` (the file format of a tuned lens or a transcoder set).

Import from the module itself (`from diffusionlens.weights.tl_weights import model_weights`); the common
names are also exported by `diffusionlens`.
"""
