"""End-to-end studies that compose the stages: the lab base recipe, the demo and its Table 6 study, the RL study
and the reward-model study."""
