-- Argo CD health check for optimodel.io/OptimizedModel.
-- Ready=True -> Healthy; Ready=False with a failure reason -> Degraded; anything else,
-- and any status that has not caught up with metadata.generation -> Progressing.
local hs = {}

-- Reasons that need a change to the spec (or the cluster) before the model can become Ready.
-- Any other reason ending in "Failed" is treated the same way.
local degradedReasons = {
  BuildFailed = true,
  AccuracyGateFailed = true,
  FetchFailed = true,
  Unauthorized = true,
  ChecksumMismatch = true,
  InvalidModel = true,
  InputMismatch = true,
  OutputMismatch = true,
  InvalidRequest = true,
  InvalidDataset = true,
  InvalidSpec = true,
  PruningUnsupported = true,
  ExportFailed = true,
  QuantizationFailed = true,
  TensorRTBuildFailed = true,
  NoGPU = true,
  NotImplemented = true,
  PublishFailed = true,
  ToolchainMismatch = true,
  CPUClassMismatch = true,
  QuotaExceeded = true,
  StoreUnavailable = true,
  DeploymentFailed = true,
}

local function isDegraded(reason)
  if reason == nil then
    return false
  end
  if degradedReasons[reason] then
    return true
  end
  return string.len(reason) > 6 and string.sub(reason, -6) == "Failed"
end

local function describe(cond, fallback)
  local text = cond.reason or fallback
  if cond.message ~= nil and cond.message ~= "" then
    text = text .. ": " .. cond.message
  end
  return text
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Ready condition is from generation " .. tostring(ready.observedGeneration)
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

if ready.status == "False" and isDegraded(ready.reason) then
  hs.status = "Degraded"
  hs.message = describe(ready, "NotReady")
  return hs
end

hs.status = "Progressing"
hs.message = describe(ready, "NotReady")
return hs
