"""A matrix kept as the product of two factors, `A @ B`, as TransformerLens' FactoredMatrix.

Per-head circuits such as QK = W_Q W_Kᵀ (`[d_model, d_model]`) have rank at most d_head, so holding
the two thin factors is cheaper than the dense product and gives the SVD, eigenvalues and norm of
the product at the cost of d_head-sized decompositions. Leading dimensions (heads, layers) broadcast.

As TransformerLens: `svd()` returns `(U, S, V)` with `U @ diag(S) @ V.mT == AB`, products keep the smallest
inner dimension on offer, indexing reaches into the two matrix dimensions, and factors may be tensor-like
objects (anything with `ndim`, `shape`, `broadcast_to` and `@`) for the products. One deliberate difference:
`Vh`, which TransformerLens keeps as a deprecated alias of `V` (it is not V's transpose), raises here,
naming `V` and `V.mT`, so that code written for either meaning cannot read the other silently.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Complex, Float


@runtime_checkable
class TensorLikeFactor(Protocol):
    """An object with the tensor protocol the products use, without subclassing torch.Tensor (TransformerLens
    accepts such wrappers as factors)."""

    ndim: int
    shape: torch.Size

    def broadcast_to(self, size: tuple[int, ...]) -> Any: ...


def _is_tensor_like(value: object) -> bool:
    """A torch tensor, or an object with the tensor protocol the products use (TransformerLens's TensorLike)."""
    return isinstance(value, torch.Tensor) or all(hasattr(value, a) for a in ("ndim", "shape", "broadcast_to"))


def _broadcast_leading(A, B) -> tuple[torch.Tensor, torch.Tensor]:
    leading = torch.broadcast_shapes(tuple(A.shape[:-2]), tuple(B.shape[:-2]))
    return A.broadcast_to((*leading, *A.shape[-2:])), B.broadcast_to((*leading, *B.shape[-2:]))


def _keeping_axis(index: object) -> object:
    """An int index of a matrix dimension as a one-entry slice, so that the dimension stays (as TransformerLens)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return slice(index, index + 1 if index != -1 else None)
    return index


class FactoredMatrix:
    """The matrix `A @ B` (shape `[..., ldim, rdim]`), stored as `A [..., ldim, mdim]` and `B [..., mdim, rdim]`.

    Decompositions are computed once and cached; treat the object as immutable.
    """

    # Shapes ([..., ldim, mdim] @ [..., mdim, rdim]) are checked below rather than in the annotation, so a
    # mismatch gets this class's message, which says what to fix.
    def __init__(
        self, A: Float[torch.Tensor, "..."] | TensorLikeFactor, B: Float[torch.Tensor, "..."] | TensorLikeFactor
    ) -> None:
        if not (_is_tensor_like(A) and _is_tensor_like(B)):
            raise TypeError(f"FactoredMatrix factors must be tensors, got {type(A).__name__} and {type(B).__name__}")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                f"FactoredMatrix factors must be at least 2-D, got A of shape {tuple(A.shape)} "
                f"and B of shape {tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"FactoredMatrix factors must match on the inner dimension: A is {tuple(A.shape)} and B is "
                f"{tuple(B.shape)}; A's last dimension ({A.shape[-1]}) must equal B's second-to-last ({B.shape[-2]})"
            )
        #: whether either factor came with dimensions before the matrix ones (TransformerLens's flag)
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        try:
            self.A, self.B = _broadcast_leading(A, B)
        except RuntimeError as err:
            raise ValueError(
                f"FactoredMatrix factors' leading (batch) dimensions mismatch, they do not broadcast: "
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
    def AB(self) -> Float[torch.Tensor, "... ldim rdim"] | TensorLikeFactor:
        """The dense product."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[torch.Tensor, "... mdim mdim"] | TensorLikeFactor:
        """`B @ A`: shares the non-zero eigenvalues of `AB` (only defined when ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square product (ldim == rdim); this FactoredMatrix is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose `Bᵀ Aᵀ`, still factored."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix | torch.Tensor:
        """`self @ other`. A vector (1-D) gives a dense vector; a matrix or FactoredMatrix gives a FactoredMatrix
        whose inner dimension is the smallest on offer: `A (B other)` keeps mdim, `(AB) other` has rdim, and
        for a FactoredMatrix `other` the product is `(self @ other.A) @ other.B`."""
        if isinstance(other, FactoredMatrix):
            self._check_inner(other.ldim, "right", tuple(other.shape))
            return (self @ other.A) @ other.B
        if not _is_tensor_like(other):
            return NotImplemented
        if other.ndim < 2:
            self._check_inner(other.shape[0], "right", tuple(other.shape))
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        self._check_inner(other.shape[-2], "right", tuple(other.shape))
        if self.mdim < self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor:
        """`other @ self` for a tensor `other` (a FactoredMatrix on the left goes through its `__matmul__`)."""
        if not _is_tensor_like(other):
            return NotImplemented
        if other.ndim < 2:
            self._check_inner(other.shape[0], "left", tuple(other.shape))
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        self._check_inner(other.shape[-1], "left", tuple(other.shape))
        if self.mdim < self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def _check_inner(self, size: int, side: str, other_shape: tuple) -> None:
        try:
            torch.broadcast_shapes(tuple(self.shape[:-2]), tuple(other_shape[:-2]))
        except RuntimeError as err:
            raise ValueError(
                f"Cannot multiply: the leading (batch) dimensions mismatch, {tuple(self.shape[:-2])} vs "
                f"{tuple(other_shape[:-2])} do not broadcast"
            ) from err
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
        """Scale by a number or a one-element tensor (as TransformerLens); for a matrix product use `@`."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(
                f"FactoredMatrix * x needs a scalar (a number or a one-element tensor), got a tensor of shape "
                f"{tuple(scalar.shape)}; for a matrix product use @"
            )
        if not isinstance(scalar, (int, float, torch.Tensor)) or isinstance(scalar, bool):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @property
    def pair(self) -> tuple[Float[torch.Tensor, "... ldim mdim"], Float[torch.Tensor, "... mdim rdim"]]:
        """The factors `(A, B)`."""
        return self.A, self.B

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """A new leading dimension at `dim` (counted on the product's shape, as on the factors')."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def make_even(self) -> FactoredMatrix:
        """The same matrix as `(U √S) (√S Vᵀ)`: each factor carries half of every singular value."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    # ------------------------------------------------------------------ decompositions
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Thin SVD without forming AB: A = Qa Ra and Bᵀ = Qb Rb, so AB = Qa (Ra Rbᵀ) Qbᵀ and only the
        # small core Ra Rbᵀ ([min(l, m), min(r, m)]) needs an SVD.
        Qa, Ra = torch.linalg.qr(self.A, mode="reduced")
        Qb, Rb = torch.linalg.qr(self.B.transpose(-2, -1), mode="reduced")
        Uc, S, Vhc = torch.linalg.svd(Ra @ Rb.transpose(-2, -1), full_matrices=False)
        return Qa @ Uc, S, Qb @ Vhc.transpose(-2, -1)  # (U, S, V)

    def svd(
        self,
    ) -> tuple[Float[torch.Tensor, "... ldim k"], Float[torch.Tensor, "... k"], Float[torch.Tensor, "... rdim k"]]:
        """Thin SVD of `AB` as TransformerLens returns it, `(U, S, V)` with `U @ diag(S) @ V.mT == AB`,
        k = min(ldim, mdim, rdim), S descending. Computed once per matrix."""
        return self._svd

    @property
    def U(self) -> Float[torch.Tensor, "... ldim k"]:
        return self._svd[0]

    @property
    def S(self) -> Float[torch.Tensor, "... k"]:
        return self._svd[1]

    @property
    def V(self) -> Float[torch.Tensor, "... rdim k"]:
        """Right singular vectors as columns: `U @ diag(S) @ V.mT == AB`."""
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        raise AttributeError(
            "FactoredMatrix.Vh is ambiguous (TransformerLens's deprecated Vh returns V, torch's Vh is V.mT): "
            "use fm.V (right singular vectors as columns) or fm.V.mT"
        )

    @cached_property
    def eigenvalues(self) -> Complex[torch.Tensor, "... mdim"]:
        """Eigenvalues of `BA`: the non-zero eigenvalues of `AB`, padded with zeros (up to rounding) to mdim.
        16-bit factors are decomposed in float32 (torch has no 16-bit eig)."""
        BA = self.BA
        if BA.dtype in (torch.bfloat16, torch.float16):
            BA = BA.float()
        return torch.linalg.eigvals(BA)

    def norm(self) -> Float[torch.Tensor, "..."]:
        """Frobenius norm of `AB`, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self) -> Float[torch.Tensor, "... k rdim"]:
        """`diag(S) @ V.mT`: drop the orthonormal left factor U, keeping everything `AB` does to its right."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> Float[torch.Tensor, "... ldim k"]:
        """`U @ diag(S)`: drop the orthonormal right factor V."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, index) -> FactoredMatrix:
        """Index the leading (e.g. head) dimensions and, as TransformerLens, the matrix dimensions: with one
        index past the leading ones it picks rows (of A), with two rows and columns (of B). An int on a
        matrix dimension keeps it with size 1, so the result is still a matrix."""
        index = index if isinstance(index, tuple) else (index,)
        n_leading = self.ndim - 2
        if Ellipsis in index or any(i is None for i in index):
            raise IndexError("FactoredMatrix indexing takes no Ellipsis or None: index each dimension explicitly")
        if len(index) > n_leading + 2:
            raise IndexError(
                f"{len(index)} indices for a FactoredMatrix of shape {tuple(self.shape)}: at most {n_leading + 2}"
            )
        leading = index[:n_leading]
        if len(index) <= n_leading:
            return FactoredMatrix(self.A[index], self.B[index])
        rows = _keeping_axis(index[n_leading])
        columns = _keeping_axis(index[n_leading + 1]) if len(index) == n_leading + 2 else slice(None)
        return FactoredMatrix(self.A[(*leading, rows, slice(None))], self.B[(*leading, slice(None), columns)])

    def get_corner(self, k: int = 3) -> Float[torch.Tensor, "... k k"]:
        """The top-left `k × k` block of `AB`, computed without forming the rest."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def to(self, *args, **kwargs) -> FactoredMatrix:
        return FactoredMatrix(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))
