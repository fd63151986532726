"""Hook machinery and what names it: `points` (HookPoint, HookedRootModule), `generation_context`
(HookContext: where in a generation a pass runs), `point_context` (each point's `hook.ctx`),
`name_filters` (which hook names a names filter picks), `names` (TransformerLens short names → hook
names) and `shapes` (every hook's shape, dtype and position axis; cache-size estimates).

Nothing is imported here: `points` sits below the model's components (they are built from HookPoints),
while `names` and `shapes` read the block's layout from `components`, so loading this package must not load
either half for the other. Import from the module itself (`from diffusionlens.hooks.points import HookPoint`).
"""
