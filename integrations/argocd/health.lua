-- Argo CD health of a PythonTask (resource.customizations.health.pythontask.dev_PythonTask):
-- Healthy once it Succeeded, Degraded once it Failed, Suspended while spec.suspend holds it,
-- Progressing otherwise, with the operator's message. A status written for an older spec (observedGeneration) or before the last rerun request
-- (the pythontask.dev/rerun annotation) says nothing about this one yet: Progressing.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick the task up."
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "The operator has not seen the latest spec yet."
  return hs
end
local annotations = obj.metadata.annotations or {}
local wanted = annotations["pythontask.dev/rerun"] or ""
if wanted ~= (status.rerunToken or "") then
  hs.status = "Progressing"
  hs.message = "A rerun was requested; the operator has not started it yet."
  return hs
end
local message = status.message or ""
if status.reason ~= nil and status.reason ~= "" then
  message = status.reason .. ": " .. message
end
if status.phase == "Succeeded" then
  hs.status = "Healthy"
elseif status.phase == "Failed" then
  hs.status = "Degraded"
elseif status.phase == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = message
return hs
