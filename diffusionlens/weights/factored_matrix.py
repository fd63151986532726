"""A matrix kept as the product of two factors, `A @ B`, as TransformerLens' FactoredMatrix.

Per-head circuits such as QK = W_Q W_Kᵀ (`[d_model, d_model]`) have rank at most d_head, so holding
the two thin factors is cheaper than the dense product and gives the SVD, eigenvalues and norm of
the product at the cost of d_head-sized decompositions. Leading dimensions (heads, layers) broadcast.

One deliberate difference from TransformerLens: `Vh` follows torch's convention, so
`U @ diag(S) @ Vh == AB`. (TransformerLens' `Vh` is V, used as `U @ diag(S) @ Vh.T`.)
"""

from __future__ import annotations

from functools import cached_property

import torch
from jaxtyping import Complex, Float


def _broadcast_leading(
    A: Float[torch.Tensor, "... ldim mdim"], B: Float[torch.Tensor, "... mdim rdim"]
) -> tuple[torch.Tensor, torch.Tensor]:
    leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    return A.expand(*leading, *A.shape[-2:]), B.expand(*leading, *B.shape[-2:])


class FactoredMatrix:
    """The matrix `A @ B` (shape `[..., ldim, rdim]`), stored as `A [..., ldim, mdim]` and `B [..., mdim, rdim]`.

    Decompositions are computed once and cached; treat the object as immutable.
    """

    # Shapes ([..., ldim, mdim] @ [..., mdim, rdim]) are checked below rather than in the annotation, so a
    # mismatch gets this class's message, which says what to fix.
    def __init__(self, A: Float[torch.Tensor, "..."], B: Float[torch.Tensor, "..."]) -> None:
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"FactoredMatrix factors must be at least 2-D, got A of shape {tuple(A.shape)} "
                f"and B of shape {tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"FactoredMatrix factors do not chain: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
                f"A's last dimension ({A.shape[-1]}) must equal B's second-to-last ({B.shape[-2]})"
            )
        try:
            self.A, self.B = _broadcast_leading(A, B)
        except RuntimeError as err:
            raise ValueError(
                f"FactoredMatrix factors' leading (batch) dimensions do not broadcast: "
                f"{tuple(A.shape[:-2])} vs {tuple(B.shape[:-2])}"
            ) from err

    # ------------------------------------------------------------------ shape
    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the product: leading dims, then `(ldim, rdim)`."""
        return torch.Size((*self.A.shape[:-2], self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        return self.A.ndim

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, dtype={self.A.dtype})"

    # ------------------------------------------------------------------ products
    @property
    def AB(self) -> Float[torch.Tensor, "... ldim rdim"]:
        """The dense product."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[torch.Tensor, "... mdim mdim"]:
        """`B @ A`: shares the non-zero eigenvalues of `AB` (only defined when ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square product (ldim == rdim); this FactoredMatrix is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose `Bᵀ Aᵀ`, still factored."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix | torch.Tensor:
        """`self @ other`. A 1-D tensor gives a dense vector; a matrix or FactoredMatrix gives a FactoredMatrix
        whose inner dimension is the smaller of the two on offer: `A (B other)` keeps mdim, `(AB) other`
        has rdim (for a FactoredMatrix `other`: this mdim or other's)."""
        if isinstance(other, FactoredMatrix):
            self._check_inner(other.ldim, "right", tuple(other.shape))
            middle = self.B @ other.A  # [..., self.mdim, other.mdim]
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, middle @ other.B)
            return FactoredMatrix(self.A @ middle, other.B)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim == 1:
            self._check_inner(other.shape[0], "right", tuple(other.shape))
            return (self.A @ (self.B @ other[:, None])).squeeze(-1)
        self._check_inner(other.shape[-2], "right", tuple(other.shape))
        if self.mdim <= self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor:
        """`other @ self` for a tensor `other` (a FactoredMatrix on the left goes through its `__matmul__`)."""
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim == 1:
            self._check_inner(other.shape[0], "left", tuple(other.shape))
            return ((other[None, :] @ self.A) @ self.B).squeeze(-2)
        self._check_inner(other.shape[-1], "left", tuple(other.shape))
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _check_inner(self, size: int, side: str, other_shape: tuple) -> None:
        own = self.rdim if side == "right" else self.ldim
        if size != own:
            which = "rdim" if side == "right" else "ldim"
            order = f"FactoredMatrix{tuple(self.shape)} @ {other_shape}"
            if side == "left":
                order = f"{other_shape} @ FactoredMatrix{tuple(self.shape)}"
            raise ValueError(
                f"Cannot multiply {order}: the FactoredMatrix's {which} is {own} but the other operand's "
                f"matching dimension is {size}"
            )

    def __mul__(self, scalar: float | torch.Tensor) -> FactoredMatrix:
        """Scale by a number (or a tensor broadcasting over the leading dims, applied as `[..., 1, 1]`)."""
        if isinstance(scalar, torch.Tensor) and scalar.ndim > 0:
            scalar = scalar[..., None, None]
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ------------------------------------------------------------------ decompositions
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Thin SVD without forming AB: A = Qa Ra and Bᵀ = Qb Rb, so AB = Qa (Ra Rbᵀ) Qbᵀ and only the
        # small core Ra Rbᵀ ([min(l, m), min(r, m)]) needs an SVD.
        Qa, Ra = torch.linalg.qr(self.A, mode="reduced")
        Qb, Rb = torch.linalg.qr(self.B.transpose(-2, -1), mode="reduced")
        Uc, S, Vhc = torch.linalg.svd(Ra @ Rb.transpose(-2, -1), full_matrices=False)
        return Qa @ Uc, S, Vhc @ Qb.transpose(-2, -1)

    def svd(
        self,
    ) -> tuple[Float[torch.Tensor, "... ldim k"], Float[torch.Tensor, "... k"], Float[torch.Tensor, "... k rdim"]]:
        """Thin SVD of `AB`, k = min(ldim, mdim, rdim): `U @ diag(S) @ Vh == AB`, S descending.

        torch's convention for Vh (rows are right singular vectors), unlike TransformerLens' `Vh`.
        """
        return self._svd

    @property
    def U(self) -> Float[torch.Tensor, "... ldim k"]:
        return self._svd[0]

    @property
    def S(self) -> Float[torch.Tensor, "... k"]:
        return self._svd[1]

    @property
    def Vh(self) -> Float[torch.Tensor, "... k rdim"]:
        return self._svd[2]

    @property
    def V(self) -> Float[torch.Tensor, "... rdim k"]:
        """Right singular vectors as columns (TransformerLens' `Vh`)."""
        return self._svd[2].transpose(-2, -1)

    @cached_property
    def eigenvalues(self) -> Complex[torch.Tensor, "... mdim"]:
        """Eigenvalues of `BA`: the non-zero eigenvalues of `AB`, padded with zeros (up to rounding) to mdim."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> Float[torch.Tensor, "..."]:
        """Frobenius norm of `AB`, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self) -> Float[torch.Tensor, "... k rdim"]:
        """`diag(S) @ Vh`: drop the orthonormal left factor U, keeping everything `AB` does to its right."""
        return self.S[..., :, None] * self.Vh

    def collapse_r(self) -> Float[torch.Tensor, "... ldim k"]:
        """`U @ diag(S)`: drop the orthonormal right factor Vh."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, index) -> FactoredMatrix:
        """Index the leading (e.g. head) dimensions only; the two matrix dimensions are kept whole."""
        index = index if isinstance(index, tuple) else (index,)
        n_leading = self.ndim - 2
        if Ellipsis in index or len(index) > n_leading:
            raise IndexError(
                f"FactoredMatrix indexing covers only its {n_leading} leading dimension(s) "
                f"{tuple(self.shape[:-2])}; got {len(index)} index/indices. For entries of the product use "
                f".AB[...] or .get_corner()"
            )
        full = (*index, slice(None), slice(None))
        return FactoredMatrix(self.A[full], self.B[full])

    def get_corner(self, k: int = 3) -> Float[torch.Tensor, "... k k"]:
        """The top-left `k × k` block of `AB`, computed without forming the rest."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def to(self, *args, **kwargs) -> FactoredMatrix:
        return FactoredMatrix(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))
