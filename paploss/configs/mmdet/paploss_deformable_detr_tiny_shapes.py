# A tiny Deformable DETR (ResNet-18 at 1/4 width from scratch, 2 encoder and 2 decoder
# layers of 64 channels, 40 queries, 128-pixel images) on paploss's bundled `shapes`
# dataset, trained with the Parameterized AP Loss (PAPLossDeformableDETRHead: every
# query x class entry ranked, per decoder layer). Small enough to train on a CPU.
#
# It ships inside the paploss package (package data), so the detector name
# `deformable_detr_tiny` (paploss.spec_set.MMDET_DETECTORS) finds it wherever paploss is
# installed: a pipeline or a TrainJob carries the name, and each machine reads its own copy.
# Trained that way, its pipelines resize to the training's image_size (128 by default).
#
#     paploss data make shapes data/shapes
#     paploss train --data data/shapes --detector deformable_detr_tiny --loss paploss --form linear \
#         --optimizer adamw --lr 0.0005 --iterations 300
#     python tools/train.py paploss/configs/mmdet/paploss_deformable_detr_tiny_shapes.py \
#         --cfg-options model.bbox_head.spec=runs/my-search/loss_spec.json
#
# The multi-scale deformable attention runs in plain PyTorch (grid_sample), supplied by
# paploss.integrations.mmcv_ops in place of mmcv's compiled op (mmcv-lite has none).
# Settings not about size follow MMDetection's deformable-detr_r50_16xb2-50e_coco.py
# (Hungarian matcher costs, single-stage, no box refinement).
#
# The default spec is the identity function in all five places (the search's start).
custom_imports = dict(imports=['paploss.integrations.mmdet_detr'], allow_failed_imports=False)
default_scope = 'mmdet'

data_root = 'data/shapes/'
classes = ('ellipse', 'rectangle', 'triangle', 'diamond', 'cross')
image_size = 128
embed_dims = 64
identity = [0.0, 0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]

model = dict(
    type='DeformableDETR',
    num_queries=40,
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(1, 2, 3),  # strides 8, 16, 32: 16x16, 8x8, 4x4 maps at 128 px
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),  # no download: from scratch
    neck=dict(
        type='ChannelMapper',
        in_channels=[32, 64, 128],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=8),
        num_outs=4),  # + a stride-64 level (2x2)
    encoder=dict(
        num_layers=2,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, num_levels=4, num_points=4, batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=2 * embed_dims, ffn_drop=0.1))),
    decoder=dict(
        num_layers=2,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, dropout=0.1, batch_first=True),
            cross_attn_cfg=dict(embed_dims=embed_dims, num_heads=8, num_levels=4, num_points=4, batch_first=True),
            ffn_cfg=dict(embed_dims=embed_dims, feedforward_channels=2 * embed_dims, ffn_drop=0.1)),
        post_norm_cfg=None),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True, offset=-0.5),
    bbox_head=dict(
        type='PAPLossDeformableDETRHead',
        num_classes=len(classes),
        embed_dims=embed_dims,
        sync_cls_avg_factor=True,
        spec=dict(points=[identity] * 5, grad_scale=1.0),
        top_k=100000,
        quality='giou',
        # not used by the PAP loss (one logit per class: sigmoid scores at inference);
        # the baselines (paploss train --loss focal+l1|focal+giou) train with them
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=100))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/'),
        filter_cfg=dict(filter_empty_gt=True),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/val.json',
        data_prefix=dict(img='images/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/val.json', metric='bbox', format_only=False)
test_evaluator = val_evaluator

# MMDetection's Deformable DETR optimiser (AdamW, gradient clipping at 0.1, the sampling
# offsets and reference points at 0.1x), at a rate for a small model from scratch.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0005, weight_decay=0.0001),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(custom_keys={
        'sampling_offsets': dict(lr_mult=0.1),
        'reference_points': dict(lr_mult=0.1)
    }))
param_scheduler = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=4)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=4),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
log_processor = dict(type='LogProcessor', window_size=10, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
