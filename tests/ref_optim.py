# Prints the torch reference values pasted into tests/test_optim.cpp. Run: /usr/bin/python3 tests/ref_optim.py
# (torch 1.13, float64).
import torch, math
torch.set_printoptions(precision=17)
def run(make_opt, steps=4):
    p = torch.tensor([[0.5, -1.25], [2.0, 0.125], [-0.75, 1.5]], dtype=torch.float64, requires_grad=True)  # 3 x 2
    opt = make_opt([p])
    for t in range(steps):
        g = torch.tensor([[math.cos(0.7*(r+3*c) + 1.3*t) for c in range(2)] for r in range(3)], dtype=torch.float64)
        p.grad = g
        opt.step()
    return p.detach()
def fmt(x):
    # column-major, as Eigen
    return ", ".join(repr(v) for v in x.t().reshape(-1).tolist())
print("sgd_nesterov", fmt(run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True))))
print("sgd_momentum", fmt(run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05))))
print("adamw", fmt(run(lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1), steps=5)))
