"""COCO mAP/AP50 via pycocotools and detection gathering across ranks."""

from gankd_ray.eval.coco_eval import STAT_NAMES, coco_from_dict, coco_results, evaluate_coco, gather_results, load_coco

__all__ = ["STAT_NAMES", "coco_from_dict", "coco_results", "evaluate_coco", "gather_results", "load_coco"]
