"""From a batch to the numbers and pictures that are logged: the forward pass and its loss
terms, per-sample metrics averaged over a whole split and every rank, whole-split
metrics gathered exactly under DDP, and figures as PNG. The hooks themselves are
documented in src/core/base.py; README, "Your own metrics".
"""

import io
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from src.core.base import BaseModel
from src.core.distributed import DistContext, all_gather_object, all_reduce_sum
from src.core.errors import UserError
from src.core.training.figures import FigureEncoder, figure_to_png


def forward(
    model: torch.nn.Module, batch: dict, loss_function, device: torch.device
) -> tuple[dict[str, torch.Tensor], object, torch.Tensor, dict]:
    """One batch through `model` (the DDP wrapper in training): its `supervision` is the target,
    its other entries go to `forward` by name. Returns the loss and its terms, the prediction,
    the target (the model's `transform` of the supervision) and the inputs."""
    batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
    supervision = batch.pop("supervision")
    prediction = model(**batch)
    target = (model.module if isinstance(model, DistributedDataParallel) else model).transform(supervision)
    return split_loss(loss_function(prediction, target)), prediction, target, batch


def split_loss(output) -> dict[str, torch.Tensor]:
    """The loss function's result as {"loss": what is minimised, **named terms}."""
    if isinstance(output, torch.Tensor):
        return {"loss": output}
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return {name: torch.as_tensor(value) for name, value in output.items()}
    found = f"a dict with keys {sorted(output)}" if isinstance(output, dict) else type(output).__name__
    raise UserError(
        f"config key 'loss_function': it returned {found}; expected a tensor, or a dict with a tensor "
        "'loss' (what is minimised) and named terms, e.g. {'loss': total, 'kl': kl}"
    )


def per_sample(name: str, value, samples: int) -> torch.Tensor:
    """A metric's values for a batch as a (samples,) float64 tensor; a scalar is the batch's mean."""
    value = torch.as_tensor(value).detach()
    if value.dim() == 0:
        return value.double().expand(samples)
    if value.shape != (samples,):
        raise UserError(
            f"the model's metrics(): {name!r} has shape {tuple(value.shape)} for a batch of {samples}; "
            f"expected one value per sample, shape ({samples},)"
        )
    return value.double()


class SampleMeans:
    """Sample-weighted means over every batch of a split and every rank: sums on the device,
    one all-reduce at the end (no synchronisation per batch)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}  # name -> (sum, count)

    def add(self, name: str, total: torch.Tensor, samples: int) -> None:
        pair = torch.stack([total.to(self.device, torch.float64), torch.tensor(float(samples), device=self.device)])
        if name in self.sums:
            self.sums[name] += pair
        else:
            self.sums[name] = pair

    def reduce(self, context: DistContext) -> dict[str, float]:
        names = sorted(self.sums)
        if context.enabled:  # a rank may have seen no batch, hence no name: agree on the names first
            names = sorted(set().union(*all_gather_object(names, context)))
        if not names:
            return {}
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        table = torch.stack([self.sums.get(name, zero) for name in names])
        all_reduce_sum(table, context)
        return {name: (row[0] / row[1]).item() for name, row in zip(names, table, strict=True)}


def overrides(model: torch.nn.Module, hook: str) -> bool:
    """Whether the model defines its own `hook` (metrics, split_metrics, figures) beside BaseModel's."""
    return getattr(type(model), hook, None) is not getattr(BaseModel, hook)


def add_model_metrics(model, means: "SampleMeans", prediction, target: torch.Tensor, inputs: dict, keep=None) -> None:
    """The model's per-sample metrics of a batch, into sample-weighted sums (and into `keep`,
    a SplitSamples, for whole-split metrics)."""
    samples = len(target)
    values = {
        name: per_sample(name, value, samples) for name, value in model.metrics(prediction, target, inputs).items()
    }
    for name, value in values.items():
        if not name.startswith("_"):
            means.add(name, value.sum(), samples)
    if keep is not None:
        keep.add(values)


class SplitSamples:
    """Every sample's values of a split, for `split_metrics`: gathered from every rank and put
    back in dataset order. Evaluation is not padded (rank r reads samples r, r + W, ...), so
    no sample is lost or counted twice."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.parts.setdefault(name, []).append(value.detach().cpu())

    def gather(self, context: DistContext) -> dict[str, torch.Tensor]:
        local = {name: torch.cat(parts) for name, parts in self.parts.items()}
        if not context.enabled:
            return local
        per_rank = all_gather_object(local, context)
        names = sorted(set().union(*per_rank))
        gathered = {}
        for name in names:
            columns = [ranks.get(name, torch.empty(0, dtype=torch.float64)) for ranks in per_rank]
            total = sum(len(column) for column in columns)
            order = [columns[index % len(columns)][index // len(columns)] for index in range(total)]
            gathered[name] = torch.stack(order) if order else torch.empty(0)
        return gathered


def figure_png(name: str, figure) -> bytes:
    """A matplotlib figure (closed afterwards) or an image tensor, (C, H, W) or (H, W) with values
    in [0, 1] or uint8, as PNG bytes."""
    return prepare_figure(name, figure)(None)


def prepare_figure(name: str, figure) -> Callable[[FigureEncoder | None], bytes]:
    """What the training thread does of a figure: check it, take it out of pyplot's figures (closed),
    or copy the image; the returned function encodes it as PNG on any thread (FigureWriter's),
    a matplotlib figure in the encoder's helper process when one is given."""
    if hasattr(figure, "savefig"):
        import matplotlib.pyplot as plt  # loaded already: the figure is matplotlib's

        plt.close(figure)  # out of pyplot's global list, which only the training thread touches

        def encode_figure(encoder: FigureEncoder | None) -> bytes:
            return figure_to_png(figure) if encoder is None else encoder.encode(figure)

        return encode_figure
    image = torch.as_tensor(figure).detach().cpu().clone()  # the model may reuse its tensor
    if image.dim() == 3:
        image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if image.dim() == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[2] not in (3, 4)):
        raise UserError(
            f"the model's figures(): {name!r} is an image of shape {tuple(figure.shape)}; expected "
            "(C, H, W) with 1, 3 or 4 channels, or (H, W), or a matplotlib figure"
        )

    def encode_image(encoder: FigureEncoder | None) -> bytes:  # PIL's encoding is quick: done on the thread
        from PIL import Image

        pixels = image if image.dtype == torch.uint8 else (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels.contiguous().numpy()).save(buffer, format="PNG")
        return buffer.getvalue()

    return encode_image
