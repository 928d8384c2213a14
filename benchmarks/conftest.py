"""Which target the latency benchmarks time: the embedded default (CPU, CI's configuration)
or a random-weight target at real size with drafters of the published shapes, for a GPU:
`python -m pytest benchmarks --benchmark-enable --bench-target llama-3.1-8b --bench-device cuda`
(scripts/gpu-check runs this)."""
from hybrid_sd.eval.synthetic import TARGETS


def pytest_addoption(parser):
    group = parser.getgroup("hybrid_sd benchmarks")
    group.addoption("--bench-target", default="smollm2", choices=["smollm2", *TARGETS],
                    help="smollm2: the embedded default with the shipped drafters (fp32, packed linears); "
                         "else a random-weight target and drafters from hybrid_sd.eval.synthetic")
    group.addoption("--bench-device", default="cpu", help="device for a synthetic target (the default runs on the CPU)")
