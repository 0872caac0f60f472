"""The CPU LSTM kernel behind LSTMPolicy.log_prob and sample: `lstm` is the fused multi-layer LSTM
over a packed token batch (hand-written backward, the step-at-a-time StepLSTM, the output head's
log-probability and the no-gradient scorer), `native` compiles `lstm_cell.c` (the cell, its backward,
the layer loops, the block sampler and scorer, the dropout masks, the head) on first use and loads it
through ctypes; without a C compiler, or with GAM_RL_NATIVE=0, `lstm` runs the same math as torch ops.
"""
