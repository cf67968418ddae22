"""Forward passes over whole splits: logits, softmax with test-time augmentation, loss and accuracy.

    logits = predict_logits(model, images_u8, mean, std)              # float32 [N, classes], eval mode
    probs = predict_probs(model, images_u8, mean, std, tta=True)      # averaged over the TTA views
    loss, acc = score(logits, labels)

What train.py's evaluation, evaluate.py and bench.py share, so that each scores the same way.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data import Batches


@torch.inference_mode()
def predict_logits(model, images, mean, std, batch_size=1000, channels_last=False, autocast=None):
    """Logits (float32) for uint8 images held on the model's device, in large batches."""
    was_training = model.training
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    batches = Batches(images, labels, batch_size, mean, std, channels_last=channels_last)
    outs = []
    for x, _ in batches.epoch():
        with autocast or nullcontext():
            outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0, device=images.device)


def tta_views(images, flips):
    """The test-time views of uint8 images [N, 1, H, W]: as they are, shifted one pixel each way
    (zeros come in at the edge), and, where mirror images keep their class, mirrored."""
    padded = F.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]
    views = [images] + [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    if flips:
        views.append(images.flip(-1))
    return views


def predict_probs(model, images, mean, std, batch_size=1000, tta=False, flips=False, channels_last=False,
                  autocast=None):
    """Softmax probabilities of uint8 images, averaged over the test-time views when `tta` is set."""
    views = tta_views(images, flips) if tta else [images]
    probs = [predict_logits(model, v.contiguous(), mean, std, batch_size, channels_last, autocast).softmax(1)
             for v in views]
    return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def log_probs(model, images, mean, std, tta=False, flips=False, channels_last=False, autocast=None):
    """Log-probabilities: log-softmax of the logits, or with `tta` the log of the averaged softmax
    (what evaluate.py --tta scores)."""
    if tta:
        return predict_probs(model, images, mean, std, tta=True, flips=flips, channels_last=channels_last,
                             autocast=autocast).clamp_min(1e-12).log()
    return predict_logits(model, images, mean, std, channels_last=channels_last, autocast=autocast).log_softmax(1)


def score(logits, labels):
    """(mean cross-entropy, accuracy in %) of logits (or log-probabilities) against labels."""
    loss = F.cross_entropy(logits, labels).item()
    acc = 100.0 * (logits.argmax(1) == labels).sum().item() / max(len(labels), 1)
    return loss, acc
