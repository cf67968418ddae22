"""The optimizers train.py builds, and a plain-tensor step for the common ones.

Constructing any `torch.optim` optimizer, stepping it or taking its state_dict imports `torch._dynamo`
(for its compile guards), which costs a short run on a CPU more than a second (results/README.md).
`Adam`, `AdamW` and `SGD` below do the same arithmetic as torch's single-tensor code paths with
the options train.py offers, and read and write torch's state_dict format, so a checkpoint moves
between them and `torch.optim` in either direction. They are used unless the model is compiled
(`--compile` imports `torch._dynamo` anyway, and torch's own optimizers cooperate with it).

    optimizer = build_optimizer(model, "adam", lr=3e-3)   # as train.py's --optimizer and --lr
"""

import torch

# The peak learning rate of each --optimizer when --lr is not given. Adam-family 3e-3: with a cosine
# schedule over a short budget it beat 1e-3 and 2e-3 (cnn, one epoch).
DEFAULT_LR = {"sgd": 0.01, "adam": 3e-3, "adamw": 3e-3, "radam": 3e-3, "adadelta": 1.0}


class PlainOptimizer:
    """What the training loop, torch.amp.GradScaler and checkpoints use of an optimizer."""

    defaults = {}  # the option names and defaults of the torch.optim class it stands for

    def __init__(self, params, **options):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups = [{**self.defaults, **options, "params": params}]
        self.state = {}

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        """torch.optim's layout: parameters are numbered in order, state is keyed by that number."""
        params = self.param_groups[0]["params"]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
            for g in self.param_groups
        ]
        return {
            "state": {i: dict(self.state[p]) for i, p in enumerate(params) if p in self.state},
            "param_groups": groups,
        }

    def load_state_dict(self, saved):
        params = self.param_groups[0]["params"]
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("the saved optimizer state is for another model")
        self.param_groups = [
            {**self.defaults, **{k: v for k, v in groups[0].items() if k != "params"}, "params": params}
        ]
        self.state = {}
        for i, p in enumerate(params):
            entry = saved["state"].get(i, saved["state"].get(str(i)))
            if entry:
                # as torch does: the step count stays a float32 on the CPU, the rest follows the parameter
                self.state[p] = {
                    k: (v.to("cpu", torch.float32) if k == "step" else v.to(p.device, p.dtype))
                    if torch.is_tensor(v)
                    else v
                    for k, v in entry.items()
                }

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        self.update_all(params, group, [self.state.setdefault(p, {}) for p in params])

    def update_all(self, params, group, states):
        for p, state in zip(params, states):
            self.update(p, p.grad, group, state)


class Adam(PlainOptimizer):
    """torch.optim.Adam without amsgrad: L2 weight decay added to the gradient."""

    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
    }

    def update(self, p, grad, group, state):
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step = state["step"].item()
        if wd and group["decoupled_weight_decay"]:
            p.mul_(1 - lr * wd)
        elif wd:
            grad = grad.add(p, alpha=wd)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))

    def update_all(self, params, group, states):
        """All parameters at once with torch's _foreach kernels (the ones torch.optim's foreach path
        uses): a dozen calls a step instead of a dozen per parameter, which is most of an optimizer
        step's time for a small model on a CPU."""
        for p, state in zip(params, states):
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        counts = {state["step"].item() for state in states}
        if len(counts) != 1 or any(p.is_sparse or p.grad.is_sparse for p in params):
            return super().update_all(params, group, states)  # parameters at different steps: one by one
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1)
        step = counts.pop() + 1
        if wd and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * wd)
        elif wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr / (1 - beta1**step))


class AdamW(Adam):
    """torch.optim.AdamW: Adam with weight decay applied to the weights, default 0.01."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2, "decoupled_weight_decay": True}


class SGD(PlainOptimizer):
    """torch.optim.SGD without dampening: momentum and Nesterov momentum, L2 weight decay."""

    defaults = {
        "lr": 1e-3,
        "momentum": 0,
        "dampening": 0,
        "weight_decay": 0,
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": None,
    }

    def update(self, p, grad, group, state):
        momentum, wd = group["momentum"], group["weight_decay"]
        if wd:
            grad = grad.add(p, alpha=wd)
        if momentum:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.detach().clone()
            else:
                state["momentum_buffer"].mul_(momentum).add_(grad)
            buf = state["momentum_buffer"]
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-group["lr"])


def build_optimizer(model, name, lr, weight_decay=0.0, momentum=0.9, nesterov=False, compiled=False):
    """The optimizer NAME (train.py's --optimizer: sgd, adam, adamw, radam or adadelta) over the model's
    parameters: the plain-tensor version where there is one, unless the model is compiled."""
    params, wd = model.parameters(), weight_decay
    if name == "sgd":
        return (torch.optim.SGD if compiled else SGD)(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd
        )
    if name == "adam":
        return (torch.optim.Adam if compiled else Adam)(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return (torch.optim.AdamW if compiled else AdamW)(params, lr=lr, weight_decay=wd)
    if name == "radam":
        return torch.optim.RAdam(params, lr, weight_decay=wd, decoupled_weight_decay=True)
    return torch.optim.Adadelta(params, lr, weight_decay=wd)
