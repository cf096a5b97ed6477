"""The built-in algorithms: one registry line each (`fedsim.algorithms.Algorithm`).

Adding an algorithm is its server half in ``strategies/<name>.py``, its client half in
``clients/<name>.py`` (or FedAvg's rule, reused), its tests, and here one import line per half
(as ``fedsim.strategies`` / ``fedsim.clients``) and one ``Algorithm`` line; or a
`register_algorithm` call in your own code. docs/architecture.md walks through FedDyn. This
module is the only place that imports both halves; tests/conformance checks every entry.
"""

from __future__ import annotations

from fedsim.clients import bags as c_bags
from fedsim.clients import fedavg as c_fedavg
from fedsim.clients import fedavg_lora as c_fedavg_lora
from fedsim.clients import feddyn as c_feddyn
from fedsim.clients import fedld as c_fedld
from fedsim.clients import fedprox as c_fedprox
from fedsim.clients import ffa_lora as c_ffa_lora
from fedsim.clients import scaffold as c_scaffold
from fedsim import lora_models  # noqa: F401 - registers the lora-mlp and hf-text models
from fedsim.algorithms import Algorithm, register_algorithm
from fedsim.strategies import bags
from fedsim.strategies import fedadam
from fedsim.strategies import fedavg
from fedsim.strategies import fedavg_lora
from fedsim.strategies import fedavgm
from fedsim.strategies import feddyn
from fedsim.strategies import fedld
from fedsim.strategies import fedprox
from fedsim.strategies import fedsvd
from fedsim.strategies import ffa_lora
from fedsim.strategies import scaffold

BUILTIN = [
    Algorithm("fedavg", fedavg.FedAvgParams, fedavg.build, c_fedavg.RULE, central_dp=True,
              summary="FedAvg: example-weighted averaging", secure_aggregation=True),
    Algorithm("fedprox", fedprox.FedProxParams, fedprox.build, c_fedprox.RULE, central_dp=True,
              summary="FedProx: FedAvg with a proximal pull on the clients", secure_aggregation=True),
    Algorithm("fedadam", fedadam.FedAdamParams, fedadam.build, c_fedavg.RULE, central_dp=True,
              summary="FedAdam: server-side Adam on the averaged update", secure_aggregation=True),
    Algorithm("scaffold", scaffold.ScaffoldParams, scaffold.build, c_scaffold.RULE, central_dp=True,
              summary="SCAFFOLD: control variates against client drift", secure_aggregation=True),
    Algorithm("feddyn", feddyn.FedDynParams, feddyn.build, c_feddyn.RULE,
              central_dp_refused="its h update reads the sum of the round's drifts (count x mean), and the "
                                 "user-level layer releases only their noised mean",
              summary="FedDyn: dynamic regularization, h on the server and g_i on each client",
              secure_aggregation=True),
    Algorithm("fedavgm", fedavgm.FedAvgMParams, fedavgm.build, c_fedavg.RULE, central_dp=True,
              summary="FedAvgM: FedAvg with server momentum", secure_aggregation=True),
    Algorithm("fedld", fedld.FedLDParams, fedld.build, c_fedld.RULE, check=fedld.check,
              central_dp_refused="its server step (the replies' principal directions and sign votes) depends "
                                 "on each reply, not only on their clipped sum",
              summary="FedLD: margin control and principal-gradient aggregation",
              secure_aggregation_refused="its server step (the replies' principal directions and sign votes) "
                                         "needs each client's reply, and secure aggregation reveals only their sum"),
    Algorithm("fedsvd", fedsvd.FedSVDParams, fedsvd.build, c_ffa_lora.RULE, check=fedsvd.check, central_dp=True,
              summary="FedSVD: LoRA B trained, B A refactorized by SVD on the server", secure_aggregation=True),
    Algorithm("ffa-lora", ffa_lora.FFALoRAParams, ffa_lora.build, c_ffa_lora.RULE, check=ffa_lora.check,
              central_dp=True, summary="FFA-LoRA: LoRA with A frozen, B trained and averaged", secure_aggregation=True),
    Algorithm("fedavg-lora", fedavg_lora.FedAvgLoRAParams, fedavg_lora.build, c_fedavg_lora.RULE,
              check=fedavg_lora.check, central_dp=True,
              summary="FedAvg-LoRA: A and B trained and averaged separately", secure_aggregation=True),
    Algorithm("bags", bags.BagsParams, bags.build, c_bags.RULE, check=bags.check,
              central_dp_refused="it is a label-DP method (noisy bag means, strategy.bags); fedsim states "
                                 "that guarantee and does not compose it with user-level DP",
              label_privacy=bags.label_privacy, summary="learning from aggregate responses (bags)",
              secure_aggregation=True),
]

for _algorithm in BUILTIN:
    register_algorithm(_algorithm, replace=True)
