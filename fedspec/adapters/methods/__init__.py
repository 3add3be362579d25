"""The built-in adapter methods, one file each: its initializer, layer builder, training hooks, server step and
its registration. Importing this package registers them all.

A method is not a class per paper: it is a :class:`~fedspec.adapters.registry.MethodSpec` that combines a *shape*
(a layer type of :mod:`fedspec.adapters.layers`), an *initializer* (which decomposition of what gives the starting
tensors) and a *base policy* (what the frozen base keeps). Adding a method of an existing shape is one new file
here, its import below, and its YAML in ``configs/adapter/`` (which holds its option defaults, see
:attr:`MethodSpec.options`). Pieces two or more methods share are in ``common.py``.

Initializers get a batch of same-shape weights ``W`` (b, out, in) in float32 or float64 (one call per group of
same-shape layers) and return either ``(B0, A0)`` of shapes (b, out, r), (b, r, in) for the low-rank additive shape,
or a dict of batched tensors named as the layer's parameters (``"lora_A.weight"``, ``"core.weight"``,
``"removed_S"``, …), which the layer's ``set_initial`` loads before it derives its base. They never draw from the
global RNG: random parts come from the generator the injector passes.

Federated rules (``MethodSpec.federated``): "lowrank" (ΔW = s·B·A: FedSVD, FFA-LoRA or FedIT apply); "linear" (ΔW
is linear in what clients train, so FedAvg of it is exact: LoRA-XS, SVFit, CLIP-SVD, LoLDU with its scalar σ owned
by the server); "nonlinear" (FedAvg of the trained tensors approximates: SORSA, KaSA, AdaLoRA, SoRA, Effort — products
of trained factors; SALT, whose α, β average exactly while every adapted singular value stays ≥ 0 but whose X·Y
product does not; DoRA's row normalization; SST, whose server resamples and re-SVDs between rounds).

Training hooks run after the optimizer step (see :mod:`fedspec.adapters.hooks` for why). Differences from the
papers' code, chosen so every method runs in one loop under DP: KaSA's, AdaLoRA's, SALT's and Effort's auxiliary
losses are applied as their own SGD step of size lr·weight after the optimizer step, not added to the task loss
(where Opacus' per-sample clipping would discard them and Adam would rescale them). Where a paper leaves a choice
open, the choice is stated in the initializer's or hook's docstring.
"""

from . import (  # noqa: F401, I001  (importing a method's module registers it; one block, not a line each)
    adalora, clip_svd, corda, dora, effort, eva, fwsvd, kasa, loldu, lora, lora_ga, lora_xs, milora, olora, pissa, salt,
    soma, sora, sorsa, sst, svfit,
)
