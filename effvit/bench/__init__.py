"""The benchmark harness behind `effvit-bench`.

    import effvit.bench
    result = effvit.bench.run(["shift"], shapes=["28x28x192"], batches=[1], quick=True)
    import pandas as pd; df = pd.DataFrame(result["records"])
"""

from effvit.bench.runner import run

__all__ = ["run"]
