"""Training-2: the methods that turn the unnormalised P_lambda into a normalised policy pi_theta.

One file per method (dpg.py: dpg_off and dpg_on, pg.py, fdpg.py, pcl.py, ac_dpg.py, ppo_dpg.py,
subtb.py, ctl.py, distill.py), each registering its config class and train function in
registry.py; what they share is written once beside them: contract.py (Training2Inputs,
Training2Result), loop.py (draws, swaps, checks, plateau, stops), draws.py (weighted draws,
thinning, replay), twist.py and twist_loop.py (the token MDP and the value-learning loop).
"""
