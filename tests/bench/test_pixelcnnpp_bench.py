"""The PixelCNN++ benchmark's baseline is pclucas14's network on the same weights."""
from __future__ import annotations

import torch

from fastar.bench.pixelcnnpp import PortPixelCNN
from fastar.models import PixelCNNpp


def test_port_baseline_is_the_same_network_and_loads():
    torch.manual_seed(0)
    for c in (1, 3):
        port = PortPixelCNN(nr_resnet=1, nr_filters=6, nr_logistic_mix=2, input_channels=c).double().eval()
        with torch.no_grad():                      # g away from ||v||, so the per-input-channel rule matters
            for name, p in port.named_parameters():
                if name.endswith("original0"):
                    p.uniform_(0.3, 2.0)
        ours = PixelCNNpp.from_pclucas14(port.state_dict(), dtype=torch.float64).eval()
        x = torch.randint(0, 256, (2, c, 8, 8))
        with torch.no_grad():
            torch.testing.assert_close(ours.params(x), port(x.double() * (2 / 255) - 1), rtol=1e-10, atol=1e-10)
