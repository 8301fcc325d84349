"""fastar ops: each public function runs a compiled kernel or its pure-PyTorch ``*_ref`` twin."""
from fastar.ops.masked_conv import masked_conv2d, masked_conv2d_ref
from fastar.ops.masked_conv_at import masked_conv2d_at, masked_conv2d_at_ref
from fastar.ops.mixture import (categorical_sample, categorical_sample_ref, discretized_mix_logistic_nll,
                                discretized_mix_logistic_nll_ref, dml_value_log_probs, dml_value_log_probs_ref,
                                sample_discretized_mix_logistic, sample_discretized_mix_logistic_ref)
from fastar.ops.wavenet import (WaveNetWeights, causal_conv1d_update, causal_conv1d_update_ref, wavenet_step,
                                wavenet_step_packed, wavenet_step_ref)
from fastar.ops.lstm_scan import (diagonal_lstm_scan, diagonal_lstm_scan_ref, row_lstm_scan, row_lstm_scan_ref, skew,
                                  skew_ref, unskew, unskew_ref)
from fastar.ops.pixelcnnpp import pixelcnnpp_ul_step, pixelcnnpp_ul_step_ref
from fastar.ops.pixelrnn import bind_pixelrnn_step, pixelrnn_step, pixelrnn_step_ref
from fastar.ops.gated_pixelcnn import (GatedPixelStepPack, gated_pixelcnn_step, gated_pixelcnn_step_packed,
                                       gated_pixelcnn_step_ref)

__all__ = ["masked_conv2d", "masked_conv2d_ref", "masked_conv2d_at", "masked_conv2d_at_ref",
           "categorical_sample", "categorical_sample_ref",
           "discretized_mix_logistic_nll", "discretized_mix_logistic_nll_ref",
           "sample_discretized_mix_logistic", "sample_discretized_mix_logistic_ref",
           "dml_value_log_probs", "dml_value_log_probs_ref",
           "causal_conv1d_update", "causal_conv1d_update_ref", "wavenet_step", "wavenet_step_ref",
           "gated_pixelcnn_step", "gated_pixelcnn_step_ref", "WaveNetWeights", "wavenet_step_packed",
           "GatedPixelStepPack", "gated_pixelcnn_step_packed",
           "skew", "skew_ref", "unskew", "unskew_ref", "diagonal_lstm_scan", "diagonal_lstm_scan_ref",
           "row_lstm_scan", "row_lstm_scan_ref", "pixelcnnpp_ul_step", "pixelcnnpp_ul_step_ref", "pixelrnn_step",
           "pixelrnn_step_ref", "bind_pixelrnn_step"]
