"""The stepper: from a batch's loss to an optimizer step, as accelerate's Accelerator does it.

It owns what one step needs beside the model: the device and the DDP wrapper, autocast
(mixed precision on CUDA), gradient accumulation without DDP's sync until a group's
last batch, loss scaling (float16), clipping, and the learning rate, a pure function of
the step (training/schedule.py). Its `state_dict` is the optimizer's, the scaler's and
the schedule's length.
"""

import contextlib
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from src.core.config.validation import Config
from src.core.distributed import DistContext
from src.core.training.measures import forward
from src.core.training.schedule import lr_factor


def autocast(config: Config, device: torch.device):
    """Mixed precision (`mixed_precision: fp16 | bf16`) on CUDA; nothing elsewhere."""
    if device.type != "cuda" or config.mixed_precision == "off":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stepper:
    def __init__(self, config: Config, model: torch.nn.Module, loss_function, context: DistContext, steps: int):
        """`model` is moved to the context's device; `steps`: optimizer steps per epoch, for the
        schedule's default length (every step of `epochs` epochs)."""
        self.config, self.loss_function, self.context = config, loss_function, context
        self.device = context.device
        self.model = model.to(self.device)
        self.train_model = (  # what training calls: the DDP wrapper when distributed
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if context.enabled
            else model
        )
        self.optimizer = model.configure_optimizer(config.optimizer)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the schedule scales this
        # The schedule's length: kept from the first attempt when a resume extends `epochs` or `max_steps`.
        self.schedule_steps = config.scheduler.total_steps or config.max_steps or steps * config.epochs
        self.set_learning_rate(0)
        use_amp = self.device.type == "cuda" and config.mixed_precision != "off"
        # float16 gradients need loss scaling against underflow; bfloat16 and float32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if use_amp and config.mixed_precision == "fp16" else None
        if config.mixed_precision != "off" and not use_amp:
            print(f"note: mixed_precision={config.mixed_precision} applies on CUDA only; training in float32")
        self.grad_norm: torch.Tensor | None = None  # before clipping, at logging steps

    def forward(self, batch: dict, sync: bool = True):
        """The training forward pass of one batch (see measures.forward). `sync=False`: under DDP,
        gradients accumulate locally until the group's last batch."""
        skip_sync = not sync and self.context.enabled
        with self.train_model.no_sync() if skip_sync else contextlib.nullcontext(), autocast(self.config, self.device):
            return forward(self.train_model, batch, self.loss_function, self.device)

    def backward(self, loss: torch.Tensor, group_size: int) -> None:
        """Gradients of `loss`, averaged over an accumulation group of `group_size` batches."""
        if group_size > 1:
            loss = loss / group_size
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, step: int) -> None:
        """Optimizer step number `step` (clipping first, when configured); then the next step's
        learning rate. At logging steps the gradients' norm before clipping is kept for `train/grad_norm`."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        logs_now = (step + 1) % self.config.log_every_n_steps == 0
        if self.config.gradient_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.gradient_clip_norm)
            self.grad_norm = norm.detach() if logs_now else None
        elif logs_now:
            gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = torch.nn.utils.get_total_norm(gradients) if gradients else None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.set_learning_rate(step + 1)

    def set_learning_rate(self, step: int) -> None:
        factor = lr_factor(step, self.config.scheduler, self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "schedule_steps": self.schedule_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.schedule_steps = state["schedule_steps"]

    def load_moments(self, state: dict) -> None:
        """A branch's start (--from-step): the parent's optimizer moments and scaler, with this
        run's own optimizer settings (a lower lr...) and schedule."""
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def steps_per_epoch(batches: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of `batches` batches, accumulated in groups (the last may be short)."""
    return math.ceil(batches / accumulation)
