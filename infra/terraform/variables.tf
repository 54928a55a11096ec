variable "region" {
  description = "AWS region of the EKS cluster."
  type        = string
}

variable "cluster_name" {
  description = "Name of the existing EKS cluster that runs Kubeflow Pipelines."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the GPU nodes (the cluster's node subnets). Pick subnets in AZs that offer the instance types."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids must name at least one subnet."
  }
}

variable "node_group_name" {
  description = "Name of the managed node group."
  type        = string
  default     = "preftune-gpu"
}

variable "kubernetes_version" {
  description = "Kubelet version of the nodes; null follows the cluster's version."
  type        = string
  default     = null
}

variable "ami_type" {
  description = "EKS-optimised GPU AMI. BOTTLEROCKET_x86_64_NVIDIA ships the NVIDIA device plugin; AL2023_x86_64_NVIDIA needs the plugin installed separately."
  type        = string
  default     = "BOTTLEROCKET_x86_64_NVIDIA"

  validation {
    condition     = contains(["BOTTLEROCKET_x86_64_NVIDIA", "AL2023_x86_64_NVIDIA"], var.ami_type)
    error_message = "ami_type must be BOTTLEROCKET_x86_64_NVIDIA or AL2023_x86_64_NVIDIA."
  }
}

variable "instance_types" {
  description = "GPU instance types, in order of preference (one NVIDIA GPU each by default: L4 / A10G, 24 GB)."
  type        = list(string)
  default     = ["g6.xlarge", "g5.xlarge"]
}

variable "capacity_type" {
  description = "ON_DEMAND or SPOT. Training steps are not checkpoint-resumable across nodes, so ON_DEMAND is the default."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.capacity_type)
    error_message = "capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "min_size" {
  description = "Fewest GPU nodes. 0 lets a cluster autoscaler scale the pool to zero between runs."
  type        = number
  default     = 0
}

variable "desired_size" {
  description = "GPU nodes at creation. Ignored afterwards so an autoscaler can own it."
  type        = number
  default     = 1
}

variable "max_size" {
  description = "Most GPU nodes."
  type        = number
  default     = 4
}

variable "disk_size_gib" {
  description = "Size of the node volume that holds container images and pod ephemeral storage (the CUDA image is ~10 GB; model caches live here too)."
  type        = number
  default     = 200
}

variable "kms_key_arn" {
  description = "KMS key for the node volumes; null uses the account's default EBS key (aws/ebs). Volumes are encrypted either way."
  type        = string
  default     = null
}

variable "extra_labels" {
  description = "More Kubernetes labels for the GPU nodes (preftune.dev/pool = gpu is always set)."
  type        = map(string)
  default     = {}
}

variable "tags" {
  description = "AWS tags for every resource."
  type        = map(string)
  default = {
    "app.kubernetes.io/part-of" = "preftune"
  }
}
