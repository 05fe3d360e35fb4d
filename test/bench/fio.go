package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// fioJob describes one fio run on a file.
type fioJob struct {
	rw      string // read, randread
	bs      string
	engine  string // psync, libaio, io_uring
	depth   int
	jobs    int
	direct  bool
	size    string // bytes to cover, "" for the whole file
	runtime int    // seconds for time-based runs; 0: run through size once
	ioSize  string // total I/O for non-time-based runs (io_size)
}

// fioResult is what the benchmark takes from fio's JSON output.
type fioResult struct {
	MBps  float64 // decimal MB/s, all jobs together
	IOPS  float64
	Secs  float64 // runtime of the slowest job
	P99us float64 // 99th percentile of a read's completion latency, µs
}

// runFio runs job j on file as id.
func runFio(id *identity, file string, j fioJob) (fioResult, error) {
	args := []string{
		"--name=bench", "--filename=" + file, "--rw=" + j.rw, "--bs=" + j.bs,
		"--ioengine=" + j.engine, fmt.Sprintf("--iodepth=%d", max(j.depth, 1)),
		fmt.Sprintf("--numjobs=%d", max(j.jobs, 1)), "--group_reporting",
		"--output-format=json", "--invalidate=0", "--randrepeat=1", "--norandommap",
	}
	if j.direct {
		args = append(args, "--direct=1")
	}
	if j.size != "" {
		args = append(args, "--size="+j.size)
	}
	if j.runtime > 0 {
		args = append(args, fmt.Sprintf("--runtime=%d", j.runtime), "--time_based")
	}
	if j.ioSize != "" {
		args = append(args, "--io_size="+j.ioSize)
	}
	cmd := id.command("fio", args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return fioResult{}, fmt.Errorf("fio %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	var doc struct {
		Jobs []struct {
			Error   int `json:"error"`
			Elapsed int `json:"elapsed"`
			Read    struct {
				BwBytes float64 `json:"bw_bytes"`
				IOPS    float64 `json:"iops"`
				Runtime int64   `json:"runtime"` // ms
				Clat    struct {
					Percentile map[string]float64 `json:"percentile"`
				} `json:"clat_ns"`
			} `json:"read"`
		} `json:"jobs"`
	}
	// fio may print warnings before the JSON document.
	raw := out.Bytes()
	if i := bytes.IndexByte(raw, '{'); i > 0 {
		raw = raw[i:]
	}
	if err := json.Unmarshal(raw, &doc); err != nil || len(doc.Jobs) == 0 {
		return fioResult{}, fmt.Errorf("fio output: %v: %.200s", err, out.String())
	}
	jb := doc.Jobs[0]
	if jb.Error != 0 {
		return fioResult{}, fmt.Errorf("fio job error %d: %s", jb.Error, errb.String())
	}
	return fioResult{
		MBps:  jb.Read.BwBytes / 1e6,
		IOPS:  jb.Read.IOPS,
		Secs:  float64(jb.Read.Runtime) / 1000,
		P99us: jb.Read.Clat.Percentile["99.000000"] / 1000,
	}, nil
}
