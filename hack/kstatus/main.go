// kstatus-check reads Kubernetes objects (a JSON array) on stdin and prints, one JSON object per line,
// what sigs.k8s.io/cli-utils/pkg/kstatus computes for each: the status Flux and kpt wait on.
// Built from the Go module proxy by hack/build-checker.sh; used by tests/cluster/test_kstatus.py.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type answer struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check: stdin is not a JSON array of objects:", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, raw := range objects {
		object := &unstructured.Unstructured{}
		// The apiserver's decoding: integers stay integers (kstatus compares generations as int64).
		if err := object.UnmarshalJSON(raw); err != nil {
			_ = out.Encode(answer{Error: err.Error()})
			continue
		}
		result, err := status.Compute(object)
		if err != nil {
			_ = out.Encode(answer{Error: err.Error()})
			continue
		}
		_ = out.Encode(answer{Status: string(result.Status), Message: result.Message})
	}
}
