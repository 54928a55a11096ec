output "node_group_arn" {
  description = "ARN of the GPU managed node group."
  value       = aws_eks_node_group.gpu.arn
}

output "node_role_arn" {
  description = "IAM role of the GPU nodes (add it to the cluster's access entries if your cluster does not do so for managed node groups)."
  value       = aws_iam_role.gpu_nodes.arn
}

output "node_selector" {
  description = "Label the pipelines select GPU nodes with."
  value       = local.pool_label
}

output "node_taint" {
  description = "Taint GPU steps must tolerate."
  value       = { key = "nvidia.com/gpu", value = "true", effect = "NoSchedule" }
}
