package harness

// ClusterOption configures StartCluster.
type ClusterOption interface{ applyCluster(*clusterConfig) }

// StockOption configures StartStockV2Proxy.
type StockOption interface{ applyStock(*stockConfig) }

// GRPCProxyOption configures StartGRPCProxy.
type GRPCProxyOption interface{ applyGRPC(*grpcConfig) }

type clusterOptionFunc func(*clusterConfig)

func (f clusterOptionFunc) applyCluster(c *clusterConfig) { f(c) }

type stockOptionFunc func(*stockConfig)

func (f stockOptionFunc) applyStock(c *stockConfig) { f(c) }

type grpcOptionFunc func(*grpcConfig)

func (f grpcOptionFunc) applyGRPC(c *grpcConfig) { f(c) }

// TLSOption switches TLS on for whichever part it is given to; see WithTLS.
type TLSOption struct{}

// WithTLS is an option of StartCluster, StartStockV2Proxy and StartGRPCProxy:
//   - members: client URLs on https with a Cluster-CA server certificate, client certificates required and
//     verified against the Cluster CA; peer mutual TLS with the Cluster CA;
//   - stock v2 proxy: https listener with a Cluster-CA certificate of both usages that is also its identity
//     toward the members, Cluster-CA client certificates required;
//   - grpc-proxy: https listener with a Client-CA certificate and --trusted-ca-file the Client CA.
func WithTLS() TLSOption { return TLSOption{} }

func (TLSOption) applyCluster(c *clusterConfig) { c.tls = true }
func (TLSOption) applyStock(c *stockConfig)     { c.tls = true }
func (TLSOption) applyGRPC(c *grpcConfig)       { c.tls = true }

var (
	_ ClusterOption   = TLSOption{}
	_ StockOption     = TLSOption{}
	_ GRPCProxyOption = TLSOption{}
)
