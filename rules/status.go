package rules

import (
	"regexp"
	"strconv"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// The Maintenance.Status answer is rewritten (we are the member that answered, and the leader). Its strings come
// from below, so each is checked; the fields etcd 3.6 added, unknown to the pinned 3.5 schema, are kept when
// they check too: etcdctl 3.6+ shows them.

// etcdVersion is how etcd writes its version, its storage version and a downgrade target.
var etcdVersion = regexp.MustCompile(`^\d{1,3}\.\d{1,3}(\.\d{1,3})?(-(alpha|beta|rc)\.\d{1,3})?$`)

// alarmText is etcd's text for an alarm in StatusResponse.Errors (AlarmMember's compact text).
var alarmText = regexp.MustCompile(`^memberID:\d{1,20} alarm:([A-Z]{1,16}) ?$`)

// checkStatus keeps the version only when it reads as one, and of the errors etcd's known texts and alarms,
// which become ours.
func (s Self) checkStatus(r *pb.StatusResponse) {
	if !etcdVersion.MatchString(r.Version) {
		r.Version = ""
	}
	errs := r.Errors[:0]
	for _, e := range r.Errors {
		if m := alarmText.FindStringSubmatch(e); m != nil {
			errs = append(errs, "memberID:"+strconv.FormatUint(s.ID, 10)+" alarm:"+m[1]+" ")
		} else if e != "" && KnownGRPCMessage(e) {
			errs = append(errs, e)
		}
	}
	r.Errors = errs
}

// Field numbers of StatusResponse and DowngradeInfo in etcd 3.6+ (api/v3/etcdserverpb/rpc.proto).
const (
	statusStorageVersion = 11 // string
	statusDBSizeQuota    = 12 // int64
	statusDowngradeInfo  = 13 // DowngradeInfo
	downgradeEnabled     = 1  // bool
	downgradeTarget      = 2  // string
)

// statusNewerFields reads the fields etcd 3.6 added to StatusResponse from the bytes the pinned schema left
// unknown and encodes again those that check: storageVersion and downgradeInfo.targetVersion must read as
// versions, the others are numbers. Anything else is dropped.
func statusNewerFields(unknown []byte) []byte {
	var (
		storage, target string
		quota           uint64
		haveQuota       bool
		downgrade       bool
		enabled         bool
	)
	eachField(unknown, func(num protowire.Number, typ protowire.Type, v []byte, n uint64) {
		switch {
		case num == statusStorageVersion && typ == protowire.BytesType && etcdVersion.Match(v):
			storage = string(v)
		case num == statusDBSizeQuota && typ == protowire.VarintType:
			quota, haveQuota = n, true
		case num == statusDowngradeInfo && typ == protowire.BytesType:
			downgrade = true
			eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, n uint64) {
				switch {
				case num == downgradeEnabled && typ == protowire.VarintType:
					enabled = n != 0
				case num == downgradeTarget && typ == protowire.BytesType && etcdVersion.Match(v):
					target = string(v)
				}
			})
		}
	})
	var out []byte
	if storage != "" {
		out = protowire.AppendTag(out, statusStorageVersion, protowire.BytesType)
		out = protowire.AppendString(out, storage)
	}
	if haveQuota {
		out = protowire.AppendTag(out, statusDBSizeQuota, protowire.VarintType)
		out = protowire.AppendVarint(out, quota)
	}
	if downgrade {
		var info []byte
		if enabled {
			info = protowire.AppendTag(info, downgradeEnabled, protowire.VarintType)
			info = protowire.AppendVarint(info, 1)
		}
		if target != "" {
			info = protowire.AppendTag(info, downgradeTarget, protowire.BytesType)
			info = protowire.AppendString(info, target)
		}
		out = protowire.AppendTag(out, statusDowngradeInfo, protowire.BytesType)
		out = protowire.AppendBytes(out, info)
	}
	return out
}

// eachField calls fn for each field of b in order, with its bytes (length-delimited) or its number (varint),
// and stops at the first malformed one.
func eachField(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte, n uint64)) {
	for len(b) > 0 {
		num, typ, k := protowire.ConsumeTag(b)
		if k < 0 {
			return
		}
		b = b[k:]
		var (
			v []byte
			n uint64
		)
		switch typ {
		case protowire.BytesType:
			v, k = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			n, k = protowire.ConsumeVarint(b)
		default:
			k = protowire.ConsumeFieldValue(num, typ, b)
		}
		if k < 0 {
			return
		}
		b = b[k:]
		fn(num, typ, v, n)
	}
}
