r"""A small differentiable 3D representation: a voxel grid of density and colour, volume-rendered in torch.

Text-to-3D methods that distil a 2D or multi-view generator into 3D (DreamFusion's score distillation and
its preference- and reward-guided descendants: DreamDPO, DreamReward) optimise a 3D representation per
prompt, rendering it from random or fixed cameras and pushing the renders towards what the generator
would draw. NeRFs and 3D Gaussians are the usual representations; at SolidWorld's scale a dense grid is
enough and has no network to train:

* **Field.** ``density`` and ``colour`` are parameters on a $G^3$ grid (default 32) over the box
  $x, z \in [-1.3, 1.3]$, $y \in [0, 2.4]$, which holds every SolidWorld scene. A point's density is
  $\sigma = \mathrm{softplus}(d)$ and its colour $\mathrm{sigmoid}(c)$, trilinearly interpolated; outside the
  box both are zero.
* **Rendering.** Orthographic rays of SolidWorld's cameras (or any azimuth, for a turntable) are sampled at
  ``samples_per_ray`` points, and composited front to back on a white background (Max, 1995):

  $$ \alpha_i = 1 - e^{-\sigma_i \delta}, \qquad T_i = \prod_{j<i} (1 - \alpha_j), \qquad
     C = \sum_i T_i \alpha_i c_i + \Big(1 - \sum_i T_i \alpha_i\Big) \cdot \mathbf 1. $$

  Colour does not depend on the view: SolidWorld's light is fixed in the world and its shading is
  Lambertian, so a surface point's shaded colour is the same from every camera.
* **Export.** A turntable GIF (12 azimuths) and a mesh: marching cubes (scikit-image) on the density grid
  at ``surface_density``, vertex colours from the colour grid, written by trimesh (``.ply``, ``.obj`` or
  ``.glb``). Pieces that would render as background (nearly white) or are specks are left out: four
  cameras leave regions seen only against the white background, where density is unconstrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.worlds.solid import AZIMUTHS_DEG, DEFAULT_SIZE, camera_rays

BOX_MIN = (-1.3, 0.0, -1.3)
BOX_MAX = (1.3, 2.4, 1.3)
"""The field's extent (x, y, z): every SolidWorld scene fits, stacked pairs included."""


@dataclass
class VoxelFieldConfig:
    """Sizes of the field and of its renderer."""

    resolution: int = 32
    """Grid cells per axis."""
    samples_per_ray: int = 96
    """Points composited along each ray through the box."""
    initial_density: float = -4.0
    """Density parameter everywhere at the start (softplus(-4) = 0.018: nearly empty)."""
    blob_density: float = 8.0
    """Extra density at the box's ground centre, fading with distance (DreamFusion's initial blob), so
    that the first renders show something for the generator to shape."""
    blob_radius: float = 0.5
    """Width of that blob in world units."""
    surface_density: float = 2.0
    """Density of the exported surface: a layer 0.35 units thick (a small primitive's half extent) at this
    density is half opaque (ln 2 / 0.35 = 1.98)."""


class VoxelField(nn.Module):
    """Density and colour on a grid; :meth:`render` gives views in [0, 1], differentiable in both."""

    def __init__(self, config: VoxelFieldConfig | None = None) -> None:
        super().__init__()
        self.config = config or VoxelFieldConfig()
        g = self.config.resolution
        centres = self.grid_points()  # (G, G, G, 3) in world units, indexed [z, y, x] like grid_sample
        blob_centre = torch.tensor([0.0, 0.4, 0.0])
        distance2 = ((centres - blob_centre) ** 2).sum(-1)
        blob = self.config.blob_density * torch.exp(-distance2 / (2 * self.config.blob_radius**2))
        self.density = nn.Parameter((self.config.initial_density + blob)[None, None])  # (1, 1, G, G, G)
        self.colour = nn.Parameter(torch.zeros(1, 3, g, g, g))

    def grid_points(self) -> torch.Tensor:
        """World coordinates of the cell centres, (G, G, G, 3) indexed [z, y, x]."""
        g = self.config.resolution
        axes = [torch.linspace(lo, hi, g) for lo, hi in zip(BOX_MIN, BOX_MAX)]
        z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return torch.stack([x, y, z], dim=-1)

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (...,) and colour (..., 3) at world points (..., 3); zero outside the box."""
        lo = torch.tensor(BOX_MIN, dtype=points.dtype, device=points.device)
        hi = torch.tensor(BOX_MAX, dtype=points.dtype, device=points.device)
        normalised = 2 * (points - lo) / (hi - lo) - 1  # grid_sample wants (x, y, z) in [-1, 1]
        flat = normalised.reshape(1, -1, 1, 1, 3)
        sigma = F.grid_sample(F.softplus(self.density), flat, align_corners=True, padding_mode="zeros")
        rgb = F.grid_sample(torch.sigmoid(self.colour), flat, align_corners=True, padding_mode="zeros")
        return sigma.reshape(points.shape[:-1]), rgb.reshape(3, -1).T.reshape(*points.shape[:-1], 3)

    def render(self, azimuths_deg: tuple[float, ...] = AZIMUTHS_DEG, size: int = DEFAULT_SIZE,
               elevation_deg: float | None = None) -> torch.Tensor:
        """Views (V, 3, H, W) in [0, 1] from orthographic cameras at ``azimuths_deg``."""
        kwargs = {} if elevation_deg is None else {"elevation_deg": elevation_deg}
        origins, directions = camera_rays(size, azimuths_deg, **kwargs)
        # The box lies between 3 and 9 units along every ray (the cameras stand 6 units from the centre).
        near, far = 3.0, 9.0
        n = self.config.samples_per_ray
        depths = near + (far - near) * (torch.arange(n, dtype=torch.float32) + 0.5) / n
        delta = (far - near) / n
        points = origins[:, :, :, None, :] + depths[:, None] * directions[:, None, None, None, :]
        sigma, rgb = self.query(points)  # (V, H, W, N), (V, H, W, N, 3)
        alpha = 1 - torch.exp(-sigma * delta)
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1] + 1e-10],
                                                dim=-1), dim=-1)
        weights = transmittance * alpha
        colour = (weights[..., None] * rgb).sum(-2) + (1 - weights.sum(-1, keepdim=True))
        return colour.permute(0, 3, 1, 2).clamp(0, 1)

    def mesh(self, path: str | Path) -> dict:
        """Write the surface (marching cubes at ``surface_density``) with vertex colours; returns counts."""
        import trimesh
        from skimage.measure import marching_cubes

        level = self.config.surface_density
        with torch.no_grad():
            sigma = F.softplus(self.density)[0, 0].numpy()  # [z, y, x]
        if not sigma.min() < level < sigma.max():
            raise ValueError(f"the field has no surface at density {level:.2f} (range {sigma.min():.2f}-"
                             f"{sigma.max():.2f}): optimise it first")
        vertices, faces, _, _ = marching_cubes(sigma, level=level)
        spacing = np.array([(hi - lo) / (self.config.resolution - 1) for lo, hi in zip(BOX_MIN, BOX_MAX)])
        xyz = vertices[:, ::-1] * spacing + np.array(BOX_MIN)  # (z, y, x) indices -> world (x, y, z)
        with torch.no_grad():
            _, colours = self.query(torch.from_numpy(xyz.astype(np.float32)))
        rgba = np.concatenate([(colours.numpy() * 255).round(), np.full((len(xyz), 1), 255)], axis=1)
        surface = trimesh.Trimesh(vertices=xyz, faces=faces[:, ::-1], vertex_colors=rgba.astype(np.uint8),
                                  process=False)
        # Four cameras leave regions that every view sees only against the white background or behind the
        # object; density there is unconstrained. Keep the coloured pieces of at least 15% of the largest one.
        pieces = surface.split(only_watertight=False)
        largest = max((len(piece.faces) for piece in pieces), default=0)
        kept = [piece for piece in pieces if len(piece.faces) >= 0.15 * largest
                and piece.visual.vertex_colors[:, :3].mean(0).min() < 0.85 * 255]
        if kept:
            surface = trimesh.util.concatenate(kept)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        surface.export(str(path))
        return {"vertices": int(len(surface.vertices)), "faces": int(len(surface.faces)),
                "pieces_dropped": len(pieces) - len(kept) if kept else 0}

    def turntable(self, path: str | Path, frames: int = 12, size: int = 64, frame_ms: int = 120) -> None:
        """An animated GIF of the field turning once (elevation 30 degrees, like SolidWorld's cameras)."""
        from PIL import Image

        with torch.no_grad():
            views = self.render(tuple(360.0 * k / frames for k in range(frames)), size=size)
        array = (views * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pictures = [Image.fromarray(a).resize((size * 2, size * 2), Image.NEAREST) for a in array]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
