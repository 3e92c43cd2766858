"""The paper's contribution as plain PyTorch: no model, no trainer.

Eq. 5 (inter-scene instance discrimination) is `inter_scene.inter_scene_loss` over the pixels of
`memory.PixelMemory` drawn by `sampling`; Eq. 8 (transformation equivariance) is
`equivariance.equivariance_loss` with the group G of `transforms`.
"""
