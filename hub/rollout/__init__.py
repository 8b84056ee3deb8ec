"""Who should run what: deployments and their revisions (``deployments.py``), the signed desired state
per device (``director.py``) and staged rollouts: the controller (``rollouts.py``), its state table
(``rollout_states.py``), wave plans (``rollout_plan.py``) and health gates (``gates.py``); offline packages for air-gapped devices
(``offline.py``)."""
