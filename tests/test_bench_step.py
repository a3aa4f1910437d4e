"""experiments.bench_step's op profile: trace events summed by the kind of XLA instruction."""
from experiments import bench_step

HLO = """HloModule jit_f
%fused_computation.1 (p: f32[4]) -> f32[4] {
  ROOT %ynn_fusion.2 = f32[4]{0} fusion(f32[4]{0} %p), kind=kCustom
}
ENTRY %main (a: f32[4]) -> f32[4] {
  %ynn_fusion = f32[4]{0} fusion(f32[4]{0} %a), kind=kCustom
  %dynamic-slice_bitcast_fusion.3 = f32[2]{0} fusion(f32[4]{0} %a), kind=kLoop
  ROOT %ynn_fusion.1 = f32[4]{0} fusion(f32[4]{0} %ynn_fusion), kind=kCustom
}
"""


def test_op_kinds_sums_program_instructions_by_kind_per_call():
    events = [
        {
            'ph': 'X',
            'name': 'ynn_fusion',
            'dur': 3000.0
        },
        {
            'ph': 'X',
            'name': 'ynn_fusion.1',
            'dur': 5000.0
        },
        {
            'ph': 'X',
            'name': 'dynamic-slice_bitcast_fusion.3',
            'dur': 2000.0
        },
        {
            'ph': 'X',
            'name': 'ThunkExecutor::Execute',
            'dur': 9e9
        },  # not an instruction
        {
            'ph': 'i',
            'name': 'ynn_fusion',
            'dur': 9e9
        },  # not a complete event
    ]
    rows = bench_step.op_kinds(events, HLO, calls=2)
    assert [(k, round(ms, 3), round(sh, 3))
            for k, ms, sh in rows] == [('ynn_fusion', 4.0, 0.8),
                                       ('dynamic-slice_bitcast_fusion', 1.0, 0.2)]
