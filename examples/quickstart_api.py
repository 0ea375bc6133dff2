"""Local learning from your own training loop (docs/api.md): wrap a model, call ``step`` per batch.

Runs offline in seconds on a CPU: scikit-learn's 8x8 digits, a small CNN of your own, DGL + MAN++
over 3 gradient-isolated blocks. Swap in ``torchvision.models.resnet18(num_classes=10)`` or
``timm.create_model("efficientnet_b0", num_classes=10)`` (with a larger ``input_size``) unchanged.
"""

import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import locallearn

torch.manual_seed(0)
torch.set_num_threads(1)

# data: 1797 grey 8x8 digits, as 3-channel tensors normalised to mean 0.5, std 0.25
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).expand(-1, 3, -1, -1)
x = (x - 0.5) / 0.25
y = torch.tensor(digits.target)
train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True, drop_last=True)
test = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=512)


class Net(nn.Module):
    """Your own model: a stem, two stages, a pooled classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.stage2 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


model = Net()
epochs = 3
ll = locallearn.wrap(
    model,
    method="dgl+manpp",  # DGL aux nets with MAN++'s momentum aux in front of each
    num_blocks=3,  # cut at the model's stages (or name them: cut_at=["stage1", "stage2"])
    input_size=8,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    lr=0.05,
    epochs=epochs,  # with steps_per_epoch: InfoPro's cosine schedule over the whole run
    steps_per_epoch=len(train),
    device="cpu",
)
print(f"{ll.num_blocks} blocks, cuts at layers {ll.model.cuts}")

for epoch in range(epochs):
    ll.train()
    for xb, yb in train:
        losses = ll.step(xb, yb)  # each block: forward, local loss, backward, step; then the EMA
    metrics = ll.evaluate(test)
    print(
        f"epoch {epoch + 1}: block losses {[round(v, 3) for v in losses.values()]}  test top1 {metrics['top1']:.1f}"
    )

with tempfile.TemporaryDirectory() as tmp:
    ll.save(Path(tmp) / "ll.pt")  # model, every block's optimizer, the schedule
    ll.load(Path(tmp) / "ll.pt")

# the trained weights as your model's own state dict: no locallearn needed to use them
mine = Net()
mine.load_state_dict(ll.export(), strict=True)
mine.eval()
with torch.no_grad():
    top1 = (mine(x[1500:]).argmax(1) == y[1500:]).float().mean().item() * 100
print(f"exported into Net: test top1 {top1:.1f}")
